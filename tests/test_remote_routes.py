"""The remote backend's three extra routes, checked on the wire: translation as chat
messages, images as `image_url` data URLs, completions through llama-server's `/infill`.

The peer is a small recording HTTP server that answers in each endpoint's streaming
format; the same routes run against a real llama-server in
tests/e2e/test_remote_llamacpp.py where it is installed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

httpx = pytest.importorskip("httpx")

from codevista.models.engine import SamplingParams  # noqa: E402
from codevista.server.features.translate import TranslationService  # noqa: E402
from codevista.server.features.vision import VisionService  # noqa: E402
from codevista.server.remote import OpenAIBackend, RemoteConfig, RemoteError  # noqa: E402
from codevista.server.translation import resolve_language  # noqa: E402
from PIL import Image  # noqa: E402


class Peer:
    """Records each POST body; answers with `script[path]`: a list of events or
    (status, body) for an error."""

    def __init__(self, script: dict, props: bool = False) -> None:
        self.script, self.props, self.bodies = script, props, []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                if self.path == "/v1/models":
                    self._json(200, {"data": [{"id": "coder"}, {"id": "vlm"}]})
                elif self.path == "/props" and peer.props:
                    self._json(200, {"default_generation_settings": {"n_ctx": 512}})
                else:
                    self._json(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                peer.bodies.append((self.path, body))
                answer = peer.script.get(self.path)
                if answer is None:
                    return self._json(404, {"error": "not found"})
                if isinstance(answer, tuple):
                    return self._json(*answer)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for event in answer:
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                if self.path != "/infill":
                    self.wfile.write(b"data: [DONE]\n\n")

            def _json(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_events(text: str, size: int = 5) -> list[dict]:
    return [{"choices": [{"delta": {"content": text[i:i + size]}, "finish_reason": None}]}
            for i in range(0, len(text), size)] + [
        {"choices": [{"delta": {}, "finish_reason": "stop"}]}]


async def connected(peer: Peer, **extra) -> OpenAIBackend:
    b = OpenAIBackend(RemoteConfig.from_setting(
        {"kind": "openai", "url": peer.url, "model": "coder", "contextTokens": 2048,
         **extra}))
    await b.load(None, "float32", lambda m: None)
    assert b.state == "ready", b.error
    return b


def test_translation_goes_as_chat_messages_and_the_code_is_cut_from_the_answer():
    answer = ("Sure! Here is the C# version:\n\n```csharp\npublic int Add(int a, int b)\n{\n"
              "    return a + b;\n}\n```\n\nThis method adds two integers.")
    peer = Peer({"/v1/chat/completions": chat_events(answer)})

    async def run():
        b = await connected(peer, chat=True)
        partials: list[str] = []
        try:
            out = await TranslationService(b).translate(
                "public int add(int a, int b) {\n    return a + b;\n}\n",
                resolve_language("java"), resolve_language("csharp"), partials.append)
        finally:
            b.close()
        return out, partials

    try:
        out, partials = asyncio.run(run())
    finally:
        peer.close()
    assert out.text == "public int Add(int a, int b)\n{\n    return a + b;\n}\n"
    assert partials and all("Sure" not in p for p in partials[1:])
    path, body = peer.bodies[-1]
    assert path == "/v1/chat/completions" and body["stream"] is True
    assert body["model"] == "coder" and body["temperature"] == 0.0
    user = body["messages"][-1]["content"]
    assert "Java" in user and "C#" in user and "return a + b;" in user


def test_image_goes_as_a_png_data_url_to_the_vision_model():
    peer = Peer({"/v1/chat/completions": chat_events("A red square on white.")})
    img = Image.new("RGB", (40, 30), "white")
    img.paste((255, 0, 0), (10, 5, 20, 15))

    async def run():
        b = await connected(peer, visionModel="vlm")
        seen: list[str] = []
        try:
            return await VisionService().explain_remote(b, img, "explain", None,
                                                        seen.append), seen
        finally:
            b.close()

    try:
        answer, seen = asyncio.run(run())
    finally:
        peer.close()
    assert answer.text == "A red square on white." and seen[-1] == answer.text
    _, body = peer.bodies[-1]
    assert body["model"] == "vlm"
    content = body["messages"][0]["content"]
    url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
    assert url.startswith("data:image/png;base64,")
    back = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert back.size == (40, 30) and back.convert("RGB").tobytes() == img.tobytes()
    assert any(c["type"] == "text" and c["text"] for c in content)


def test_a_server_without_image_support_is_a_clear_error():
    peer = Peer({"/v1/chat/completions": (500, {"error": {
        "message": "image input is not supported - hint: you may need to provide mmproj"}})})

    async def run():
        b = await connected(peer, visionModel="coder")
        try:
            await VisionService().explain_remote(b, Image.new("RGB", (8, 8)), "explain", None)
        finally:
            b.close()

    try:
        with pytest.raises(RemoteError, match="does not accept images"):
            asyncio.run(run())
    finally:
        peer.close()


def test_llama_server_is_recognised_and_completions_use_infill_with_cache_prompt():
    events = [{"content": "    return", "stop": False}, {"content": " a + b", "stop": False},
              {"content": "", "stop": True, "stop_type": "eos", "tokens_cached": 17,
               "timings": {"cache_n": 17}}]
    peer = Peer({"/infill": events}, props=True)

    async def run():
        b = await connected(peer)
        try:
            assert b.infill
            gen = b.submit_infill("def add(a, b):\n", "\n", SamplingParams(max_new_tokens=8))
            parts = [d async for d in gen.astream()]
            return parts, await gen.aresult()
        finally:
            b.close()

    try:
        parts, result = asyncio.run(run())
    finally:
        peer.close()
    assert "".join(parts) == result.text == "    return a + b"
    assert result.cached_tokens == 17 and result.finish_reason == "stop"
    path, body = peer.bodies[-1]
    assert path == "/infill" and body["cache_prompt"] is True and body["stream"] is True
    assert body["input_prefix"] == "def add(a, b):\n" and body["input_suffix"] == "\n"
    assert body["n_predict"] == 8 and "max_tokens" not in body


def test_infill_is_off_for_other_servers_and_when_set_off():
    peer = Peer({}, props=False)
    peer2 = Peer({}, props=True)

    async def run():
        a = await connected(peer)
        b = await connected(peer2, infill=False)
        try:
            return a.infill, b.infill
        finally:
            a.close()
            b.close()

    try:
        assert asyncio.run(run()) == (False, False)
    finally:
        peer.close()
        peer2.close()


@pytest.mark.parametrize("bad", [{"chat": "yes"}, {"infill": "sometimes"},
                                 {"visionModel": ""}, {"contextTokens": 3}])
def test_new_fields_are_validated(bad):
    with pytest.raises(ValueError):
        RemoteConfig.from_setting({"kind": "openai", "url": "http://x", "model": "m", **bad})
