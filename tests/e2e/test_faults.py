"""Faults while serving, on the real server process: broken checkpoints (truncated or corrupt
safetensors, a config that lies about shapes, no tokenizer), the model directory removed or
rewritten under a running server, inputs beyond every budget, hostile images. Each gives a
clear message; the server stays up; the next request works.

The remote backend dropping the connection mid-stream is tested against a real llama.cpp
server in tests/e2e/test_remote_llamacpp.py (test_cancel_closes_the_stream_and_a_killed_
server_is_an_error)."""

from __future__ import annotations

import base64
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from rawlsp import RawServer
from test_checkpoints import _bad
from test_reliability_images import hostile_bytes

BROKEN = {  # kind -> words the user must read
    "truncated": "not a valid safetensors file",
    "garbage": "not a valid safetensors file",
    "lying_shapes": "config.json implies",
    "missing_tokenizer": "tokenizer",
}
CODE = "def add(a, b):\n    return "


def _next_status(s: RawServer, before: int, timeout: float = 60) -> dict[str, Any]:
    """The first final status sent after the first `before` status notifications."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for st in s.notifications("codevista/status")[before:]:
            if st["state"] in ("ready", "error"):
                return st
        time.sleep(0.02)
    raise TimeoutError("no final status")


def _switch(s: RawServer, path: Path | str) -> dict[str, Any]:
    before = len(s.notifications("codevista/status"))
    s.notify("workspace/didChangeConfiguration",
             {"settings": {"codevista": {"modelPath": str(path)}}})
    return _next_status(s, before)


def _complete(s: RawServer, uri: str = "file:///f.py") -> dict[str, Any]:
    s.open(uri, CODE)
    return s.inline(uri, 1, 11)


def test_broken_checkpoints_are_reported_and_the_next_good_one_serves(qwen_dir, tmp_path):
    with RawServer() as s:
        s.initialize({"modelPath": str(qwen_dir), "maxTokens": 8})
        assert s.wait_status()["state"] == "ready"
        good = _complete(s)["result"]
        assert good is not None
        for kind, words in BROKEN.items():
            path = _bad(kind, qwen_dir, tmp_path)
            shown = len(s.notifications("window/showMessage"))
            status = _switch(s, path)
            assert status["state"] == "error" and words in status["message"], (kind, status)
            messages = s.notifications("window/showMessage")[shown:]
            assert any(m["type"] == 1 and words in m["message"] for m in messages), messages
            assert _complete(s)["result"] is None  # no model: nothing, not an error
            r = s.request("workspace/executeCommand", {"command": "codevista.translate",
                                                       "arguments": [{"uri": "file:///f.py",
                                                                      "targetLanguage": "go"}]})
            assert "not ready" in r["error"]["message"] and words in r["error"]["message"]
            assert s.alive_and_serving()
        assert _switch(s, qwen_dir)["state"] == "ready"
        assert _complete(s)["result"] == good  # the same model answers the same again


def test_model_directory_removed_and_rewritten_while_serving(qwen_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(qwen_dir, model)
    with RawServer() as s:
        s.initialize({"modelPath": str(model), "maxTokens": 8})
        assert s.wait_status()["state"] == "ready"
        before = _complete(s)["result"]
        # rewritten in place (truncated), then removed: the loaded weights are the
        # server's own copy, so it keeps serving the same answers
        with open(model / "model.safetensors", "r+b") as f:
            f.truncate(100)
        shutil.rmtree(model)
        assert _complete(s)["result"] == before
        assert s.proc.poll() is None
        # a reload from the missing folder is an error the user reads; the server stays up
        status = _switch(s, f"{model}/")
        assert status["state"] == "error" and "does not exist" in status["message"]
        assert s.alive_and_serving()
        assert _switch(s, qwen_dir)["state"] == "ready"
        assert _complete(s)["result"] == before


@pytest.mark.slow
def test_inputs_beyond_every_budget_get_clear_errors(qwen_dir, llava_dirs, tmp_path):
    """A translation source over the 1 MiB cap, an image question longer than the vision
    model's context, a completion in a file far past the model's context (answered from
    the window the budget allows; tests/e2e/test_fuzz_protocol.py does 8 MB files)."""
    with RawServer() as s:
        s.initialize({"modelPath": str(qwen_dir), "maxTokens": 8,
                      "visionModelPath": str(llava_dirs["clip_llama"]),
                      "visionMaxTokens": 8}, root=tmp_path)
        assert s.wait_status()["state"] == "ready"
        big = "def f():\n    return 1\n" * 60_000  # 1.3 MB
        s.open("file:///big.py", big)
        r = s.request("workspace/executeCommand", {"command": "codevista.translate",
                                                   "arguments": [{"uri": "file:///big.py",
                                                                  "targetLanguage": "java"}]})
        assert r["error"]["code"] == -32602 and "at most" in r["error"]["message"], r
        png = base64.b64encode(hostile_bytes()["one_pixel"][0]).decode()
        r = s.request("workspace/executeCommand", {"command": "codevista.explainImage",
                                                   "arguments": [{"image": {"data": png},
                                                                  "question": "why? " * 5000}]})
        assert r["error"]["code"] == -32602 and "too long" in r["error"]["message"], r
        lines = big.split("\n")
        assert "result" in s.inline("file:///big.py", len(lines) - 1, 0)
        assert "result" in _complete(s)


@pytest.mark.slow
def test_hostile_images_through_the_server(llava_dirs, tmp_path):
    (tmp_path / "ok.png").write_bytes(hostile_bytes()["one_pixel"][0])
    with RawServer() as s:
        s.initialize({"visionModelPath": str(llava_dirs["clip_llama"]), "visionMaxTokens": 8,
                      "modelPath": "/nonexistent/model"}, root=tmp_path)
        s.wait_status()
        answered = refused = 0
        for name, (data, error) in hostile_bytes().items():
            r = s.request("workspace/executeCommand", {
                "command": "codevista.explainImage",
                "arguments": [{"image": {"data": base64.b64encode(data).decode()}}]},
                timeout=60)
            if error is None:
                assert isinstance(r["result"]["text"], str), (name, r)
                answered += 1
            else:
                assert r["error"]["code"] == -32602 and error in r["error"]["message"] or \
                    name == "truncated_png", (name, r)
                refused += 1
            assert s.proc.poll() is None
        for image in ({"path": "../../../../etc/passwd"}, {"uri": "file:///etc/hostname"},
                      {"path": "/proc/self/environ"}):
            r = s.request("workspace/executeCommand", {"command": "codevista.explainImage",
                                                       "arguments": [{"image": image}]})
            assert "outside the workspace" in r["error"]["message"], r
        ok = s.request("workspace/executeCommand", {"command": "codevista.explainImage",
                                                    "arguments": [{"image": {"path": "ok.png"}}]},
                       timeout=60)
        assert isinstance(ok["result"]["text"], str)
        assert (answered, refused) == (4, 7)

