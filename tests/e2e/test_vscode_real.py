"""The VS Code extension in a real VS Code: code-server with the built .vsix installed,
driven by Playwright in headless Chromium, with the real server and the embedded model.
Screenshots of each step go to `$CODEVISTA_SHOTS` (default: the test's tmp folder).

Needs code-server and playwright-core (`editor-clients/vscode/e2e/install.sh` puts them in
`$CODEVISTA_CODE_SERVER_DIR`, default `~/.cache/codevista-code-server`) and Chromium;
skipped when they are absent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXT = ROOT / "editor-clients" / "vscode"
CS_DIR = Path(os.environ.get("CODEVISTA_CODE_SERVER_DIR",
                             Path.home() / ".cache" / "codevista-code-server"))
CODE_SERVER = CS_DIR / "node_modules" / ".bin" / "code-server"
PLAYWRIGHT = CS_DIR / "node_modules" / "playwright-core"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.vscode,
    pytest.mark.skipif(not CODE_SERVER.exists() or not PLAYWRIGHT.is_dir() or not CHROMIUM
                       or shutil.which("npm") is None,
                       reason="code-server, playwright-core or chromium not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for p in [*proc.children(recursive=True), proc]:  # the language server too
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def test_ghost_text_accept_translate_and_locate_in_code_server(tmp_path):
    if not (EXT / "node_modules" / "vscode-languageclient").is_dir():
        assert subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=EXT,
                              timeout=600).returncode == 0
    assert subprocess.run(["npm", "run", "package"], cwd=EXT, capture_output=True,
                          timeout=600).returncode == 0
    data, exts, ws = tmp_path / "data", tmp_path / "ext", tmp_path / "ws"
    shots = Path(os.environ.get("CODEVISTA_SHOTS", tmp_path / "shots"))
    for d in (data / "User", exts, ws, shots):
        d.mkdir(parents=True, exist_ok=True)
    (ws / "main.py").write_text("import math\n\n\ndef circle(r):\n    return math.pi * r * r\n")
    from codevista.models.train.vlm_data import sample

    scene = next(x for x in (sample("test", 1_000_000 + i) for i in range(60))
                 if x.kind == "locate")  # a held-out scene for the default VLM
    scene.image.save(ws / "scene.png")
    (data / "User" / "settings.json").write_text(json.dumps({
        "security.workspace.trust.enabled": False,
        "workbench.startupEditor": "none",
        "editor.inlineSuggest.enabled": True,
        "codevista.pythonPath": sys.executable,
        "codevista.maxTokens": 32,
        "files.simpleDialog.enable": True,
    }))
    common = ["--user-data-dir", str(data), "--extensions-dir", str(exts)]
    inst = subprocess.run([str(CODE_SERVER), *common, "--install-extension",
                           str(EXT / "codevista.vsix")], capture_output=True, text=True,
                          timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    port = _free_port()
    server = subprocess.Popen(
        [str(CODE_SERVER), *common, "--auth", "none", "--bind-addr", f"127.0.0.1:{port}",
         "--disable-telemetry", "--disable-update-check", "--disable-workspace-trust",
         str(ws)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        env = {**os.environ, "CS_URL": f"http://127.0.0.1:{port}", "WORKSPACE": str(ws),
               "SHOTS": str(shots), "PLAYWRIGHT_CORE": str(PLAYWRIGHT), "CHROMIUM": CHROMIUM,
               "LOCATE": scene.question}
        run = subprocess.run(["node", str(EXT / "e2e" / "run.js")], env=env,
                             capture_output=True, text=True, timeout=400)
    finally:
        _kill_tree(server.pid)
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]
    assert lines, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads(lines[-1])
    print(json.dumps(result)[:3000])
    assert result["ok"], result.get("error")
    assert result["ghost"].strip(), "no ghost text"
    assert result["accepted"] and result["ghost"].strip().split("\n")[0] in result["after"]
    assert result["translation"].strip()
    # the image command's Locate task: the answer in the panel, its box drawn on the image
    located = result.get("located")
    assert located and located["boxes"] == 1 and "[" in located["text"], located
    for step in ("1-ready", "2-ghost-text", "3-accepted", "4-translation", "5-locate"):
        assert (shots / f"{step}.png").is_file()
