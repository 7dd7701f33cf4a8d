"""The VS Code extension compiles (strict TypeScript against the VS Code API), its logic
unit tests pass, and it packages as a .vsix."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EXT = Path(__file__).resolve().parents[1] / "editor-clients" / "vscode"
pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="npm not installed")


def _npm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["npm", *args], cwd=EXT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed():
    if not (EXT / "node_modules" / "vscode-languageclient").is_dir():
        proc = _npm("ci", "--no-audit", "--no-fund")
        if proc.returncode != 0:
            pytest.skip(f"npm ci failed (registry unreachable?): {proc.stderr[-500:]}")
    return EXT


def test_compiles_and_unit_tests_pass(installed):
    proc = _npm("test")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout


def test_packages_as_vsix(installed, tmp_path):
    proc = _npm("run", "package")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    vsix = EXT / "codevista.vsix"
    import zipfile

    names = zipfile.ZipFile(vsix).namelist()
    assert "extension/out/extension.js" in names and "extension/package.json" in names
    assert any(n.startswith("extension/node_modules/vscode-languageclient/") for n in names)
