"""The remote backend against llama.cpp's own server (`llama-server`, built from the
sources the pinned llama-cpp-python release vendors by tests/e2e/build_llama_server.sh),
serving the embedded model exported by `codevista export-gguf`: completions through
`/infill` with `cache_prompt`, chat completions, and an image sent to a server that has no
vision projector. Skipped where llama-server has not been built."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")

import pytest_lsp  # noqa: E402
from codevista.models.engine import Engine, SamplingParams  # noqa: E402
from codevista.models.loader import DEFAULT_MODEL_DIR, load_model  # noqa: E402
from codevista.server.features.vision import VisionService  # noqa: E402
from codevista.server.remote import OpenAIBackend, RemoteConfig, RemoteError  # noqa: E402
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
from PIL import Image  # noqa: E402
from pytest_lsp import ClientServerConfig, LanguageClient  # noqa: E402

BINARY = Path(os.environ.get("CODEVISTA_LLAMA_SERVER") or
              Path.home() / ".cache/codevista-llama-server/0.3.36/llama-server")
if not os.access(BINARY, os.X_OK):
    pytest.skip("llama-server not built (tests/e2e/build_llama_server.sh)",
                allow_module_level=True)

ALIAS = "codevista-default"



@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from codevista.models.gguf_export import export_gguf

    gguf = export_gguf(DEFAULT_MODEL_DIR, tmp_path_factory.mktemp("gguf") / "cv.gguf", "f32")
    port = free_port()
    proc = subprocess.Popen(
        [str(BINARY), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "-c", "1024", "-np", "1", "-t", "2", "--alias", ALIAS, "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "LD_LIBRARY_PATH": str(BINARY.parent)})  # a shared-library build
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}")
            time.sleep(0.1)
        else:
            raise TimeoutError("llama-server did not start")
        yield url
    finally:
        proc.kill()
        proc.wait()


def backend_for(url: str, **extra) -> OpenAIBackend:
    return OpenAIBackend(RemoteConfig.from_setting(
        {"kind": "openai", "url": url, "model": ALIAS, "timeoutMs": 20000,
         "contextTokens": 1024, **extra}))


def local_greedy(prompt: str, n: int) -> str:
    loaded = load_model(DEFAULT_MODEL_DIR)
    ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
    with Engine(loaded) as engine:
        return engine.generate(ids, SamplingParams(max_new_tokens=n)).text


async def _collect(gen):
    parts = [d async for d in gen.astream()]
    result = await gen.aresult()
    assert result.error is None, result.error
    assert "".join(parts) == result.text
    return result


PREFIX = "def total(xs):\n    s = 0\n    for x in xs:\n"
SUFFIX = "\n    return s\n"


def test_infill_greedy_equals_codevista_and_reuses_the_servers_cache(server):
    """/infill builds <|fim_prefix|>P<|fim_suffix|>S<|fim_middle|> from the GGUF's FIM ids;
    the in-process engine on that very prompt gives the same greedy text. The next
    keystroke's request finds the shared prefix in the server's KV cache."""
    expected = local_greedy(f"<|fim_prefix|>{PREFIX}<|fim_suffix|>{SUFFIX}<|fim_middle|>", 16)

    async def run():
        b = backend_for(server)
        await b.load(None, "float32", lambda m: None)
        assert b.state == "ready" and b.infill, b.error
        try:
            first = await _collect(b.submit_infill(PREFIX, SUFFIX, SamplingParams(
                max_new_tokens=16, temperature=0.0)))
            second = await _collect(b.submit_infill(PREFIX + "        s", SUFFIX,
                                                    SamplingParams(max_new_tokens=8,
                                                                   temperature=0.0)))
            return first, second
        finally:
            b.close()

    first, second = asyncio.run(run())
    assert first.text == expected
    assert second.cached_tokens >= 10, second  # the prefix up to the typed text


def test_chat_stream_equals_the_servers_unstreamed_answer(server):
    messages = [{"role": "user", "content": "Translate to Go: def add(a, b): return a + b"}]
    direct = httpx.post(f"{server}/v1/chat/completions", timeout=60, json={
        "model": ALIAS, "messages": messages, "max_tokens": 24, "temperature": 0.0,
        "repeat_penalty": 1.0}).json()["choices"][0]["message"]["content"]

    async def run():
        b = backend_for(server, chat=True)
        await b.load(None, "float32", lambda m: None)
        try:
            return await _collect(b.submit_chat(messages, SamplingParams(
                max_new_tokens=24, temperature=0.0)))
        finally:
            b.close()

    assert asyncio.run(run()).text == direct


def test_image_to_a_server_without_a_projector_is_a_clear_error(server):
    async def run():
        b = backend_for(server, visionModel=ALIAS)
        await b.load(None, "float32", lambda m: None)
        try:
            await VisionService().explain_remote(b, Image.new("RGB", (32, 32), "red"),
                                                 "explain", None)
        finally:
            b.close()

    with pytest.raises(RemoteError, match="does not accept images"):
        asyncio.run(run())


@pytest.fixture
def lsp_settings(server):
    return {"maxTokens": 24, "contextTokens": 900, "backend": {
        "kind": "openai", "url": server, "model": ALIAS, "contextTokens": 1024}}


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient, lsp_settings):
    track_status(lsp_client)
    await lsp_client.initialize_session(types.InitializeParams(
        capabilities=capabilities("vscode"), initialization_options=lsp_settings))
    yield
    await lsp_client.shutdown_session()


async def test_ghost_text_streams_through_infill(client):
    """The language server recognises llama-server and sends completions to /infill:
    the ghost text equals the in-process engine's output for the server's FIM prompt."""
    from codevista.server.documents import Snapshot
    from codevista.server.postprocess import Policy, finish

    text = "import os\n\n\ndef read(path):\n    "
    snap = Snapshot(uri="file:///r.py", version=1, text=text, language_id="python",
                    offset=len(text))
    raw = local_greedy(f"<|fim_prefix|>{text}<|fim_suffix|><|fim_middle|>", 24)
    expected = finish(Policy.for_snapshot(snap).cut(raw)[0], snap)

    status = await wait_ready(client)
    assert status["state"] == "ready", status
    partials = record_partials(client)
    open_doc(client, "file:///r.py", text)
    token = str(uuid.uuid4())
    result = await inline(client, "file:///r.py", 4, 4, token=token)
    final = result.items[0].insert_text if result.items else ""
    got = [v["items"][0]["insertText"] for v in partials.get(token, [])]
    assert final == expected
    if final:
        assert got and got[-1] == final
