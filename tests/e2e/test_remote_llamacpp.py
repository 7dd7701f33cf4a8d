"""The remote backend against a real OpenAI-compatible server: llama.cpp (through
llama-cpp-python's server) serving the embedded model exported as GGUF by
`codevista export-gguf`. Skipped where llama-cpp-python[server] is not installed."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import pytest_lsp  # noqa: E402
from codevista.models.engine import Engine, SamplingParams  # noqa: E402
from codevista.models.loader import DEFAULT_MODEL_DIR, load_model  # noqa: E402
from codevista.server.remote import OpenAIBackend, RemoteConfig  # noqa: E402
from conftest import (  # noqa: E402
    SERVER,
    capabilities,
    free_port,
    inline,
    open_doc,
    record_partials,
    track_status,
    wait_ready,
)
from lsprotocol import types  # noqa: E402
from pytest_lsp import ClientServerConfig, LanguageClient  # noqa: E402


class Server:
    def __init__(self, gguf: Path, api_key: str | None = None) -> None:
        self.gguf, self.api_key, self.port = gguf, api_key, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf),
               "--model_alias", "codevista-default", "--host", "127.0.0.1",
               "--port", str(self.port), "--n_ctx", "512", "--n_threads", "2"]
        if self.api_key:
            cmd += ["--api_key", self.api_key]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise TimeoutError("llama.cpp server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    from codevista.models.gguf_export import export_gguf

    return export_gguf(DEFAULT_MODEL_DIR, tmp_path_factory.mktemp("gguf") / "cv.gguf", "f32")


@pytest.fixture(scope="module")
def server(gguf):
    s = Server(gguf)
    s.start()
    yield s
    s.stop()


def backend_for(url: str, model: str = "codevista-default", key_env: str | None = None):
    return OpenAIBackend(RemoteConfig.from_setting(
        {"kind": "openai", "url": url, "model": model, "apiKeyEnv": key_env,
         "timeoutMs": 20000, "contextTokens": 512}))


async def _complete(b: OpenAIBackend, ids: list[int], n: int = 16) -> str:
    await b.load(None, "float32", lambda m: None)
    assert b.state == "ready", b.error
    try:
        gen = b.submit(ids, SamplingParams(max_new_tokens=n, temperature=0.0))
        parts = [d async for d in gen.astream()]
        result = await gen.aresult()
        assert result.error is None, result.error
        assert "".join(parts) == result.text
        return result.text
    finally:
        b.close()


PROMPTS = ["<|lang:python|>def add(a, b):\n    return",
           "<|lang:java|>public int size() {\n",
           "<|lang:python|><|fim_suffix|>\n    return total\n<|fim_prefix|>def sum_all(xs):\n"
           "    total = 0\n<|fim_middle|>"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llamacpp_greedy_equals_codevista(server, prompt):
    loaded = load_model(DEFAULT_MODEL_DIR)
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
    with Engine(loaded) as engine:
        ours = engine.generate(ids, SamplingParams(max_new_tokens=16)).text
    theirs = asyncio.run(_complete(backend_for(server.url), ids))
    assert theirs == ours


def test_wrong_model_name_is_reported(server):
    b = backend_for(server.url, model="qwen2.5-coder-7b")
    asyncio.run(b.load(None, "float32", lambda m: None))
    assert b.state == "error" and "not 'qwen2.5-coder-7b'" in b.error


def test_server_down_then_back(gguf):
    s = Server(gguf)
    b = backend_for(s.url)
    asyncio.run(b.load(None, "float32", lambda m: None))
    assert b.state == "error" and "down or unreachable" in b.error
    s.start()
    try:
        ids = load_model(DEFAULT_MODEL_DIR).tokenizer.encode(PROMPTS[0],
                                                             add_special_tokens=False)
        assert asyncio.run(_complete(backend_for(s.url), ids, 4))
    finally:
        s.stop()


def test_cancel_closes_the_stream_and_a_killed_server_is_an_error(gguf):
    s = Server(gguf)
    s.start()
    ids = load_model(DEFAULT_MODEL_DIR).tokenizer.encode(PROMPTS[0], add_special_tokens=False)

    async def run():
        b = backend_for(s.url)
        await b.load(None, "float32", lambda m: None)
        gen = b.submit(ids, SamplingParams(max_new_tokens=400, temperature=0.0))
        async for _ in gen.astream():
            gen.cancel()
        first = await gen.aresult()
        gen2 = b.submit(ids, SamplingParams(max_new_tokens=400, temperature=0.0))
        async for _ in gen2.astream():
            s.stop()  # the server dies mid-stream
        second = await gen2.aresult()
        b.close()
        return first, second

    try:
        first, second = asyncio.run(run())
    finally:
        s.stop()
    assert first.finish_reason == "cancelled"
    assert second.error is not None and "broke" in str(second.error) or \
        second.finish_reason in ("stop", "length")


def test_wrong_api_key_is_reported(gguf, monkeypatch):
    s = Server(gguf, api_key="right-key")
    s.start()
    try:
        monkeypatch.setenv("CV_TEST_KEY", "wrong-key")
        b = backend_for(s.url, key_env="CV_TEST_KEY")
        asyncio.run(b.load(None, "float32", lambda m: None))
        assert b.state == "error" and "refused the API key" in b.error
        assert "wrong-key" not in b.error
        monkeypatch.setenv("CV_TEST_KEY", "right-key")
        b = backend_for(s.url, key_env="CV_TEST_KEY")
        asyncio.run(b.load(None, "float32", lambda m: None))
        assert b.state == "ready", b.error
        b.close()
    finally:
        s.stop()
        os.environ.pop("CV_TEST_KEY", None)


@pytest.fixture
def lsp_remote_settings(server):
    return {"maxTokens": 24, "contextTokens": 488, "backend": {
        "kind": "openai", "url": server.url, "model": "codevista-default",
        "contextTokens": 512}}


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def remote_client(lsp_client: LanguageClient, lsp_remote_settings):
    track_status(lsp_client)
    await lsp_client.initialize_session(types.InitializeParams(
        capabilities=capabilities("vscode"), initialization_options=lsp_remote_settings))
    yield
    await lsp_client.shutdown_session()


async def test_completions_stream_through_the_language_server(remote_client):
    """The LSP server with the remote backend: the ghost text streams, and equals the
    in-process engine's greedy completion of the same (unhealed) prompt."""
    import uuid

    from codevista.server.documents import Snapshot
    from codevista.server.postprocess import Policy, finish
    from codevista.server.prompts import build_prompt, detect_family

    text = "import os\n\n\ndef read(path):\n    "
    loaded = load_model(DEFAULT_MODEL_DIR)
    family = detect_family(loaded.tokenizer)
    snap = Snapshot(uri="file:///r.py", version=1, text=text, language_id="python",
                    offset=len(text))
    policy = Policy.for_snapshot(snap)
    prompt = build_prompt(family, loaded.tokenizer, snap, 488, path=snap.uri,
                          heal_tokens=False)
    with Engine(loaded) as engine:
        raw = engine.generate(prompt.ids, SamplingParams(max_new_tokens=24)).text
    expected = finish(policy.cut(raw)[0], snap)

    status = await wait_ready(remote_client)
    assert status["state"] == "ready" and status["model"] == "codevista-default", status
    partials = record_partials(remote_client)
    open_doc(remote_client, "file:///r.py", text)
    token = str(uuid.uuid4())
    result = await inline(remote_client, "file:///r.py", 4, 4, token=token)
    final = result.items[0].insert_text if result.items else ""
    got = [v["items"][0]["insertText"] for v in partials.get(token, [])]
    assert final and final == expected  # non-empty for this prompt with these weights
    assert got and got[-1] == final
