"""Drive `codevista serve` as an editor would, over stdio (pygls's LSP client).

Used by `codevista demo` and by `benchmarks/lsp_latency.py`: open a document, type into
it with incremental `didChange` notifications, ask for streamed inline completions and
record when the first partial and the final answer arrive.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from lsprotocol import types
from pygls.lsp.client import BaseLanguageClient
from pygls.protocol.json_rpc import JsonRPCRequestMessage

SERVE = [sys.executable, "-m", "codevista.server.cli", "serve"]


@dataclass
class Timing:
    sent: float
    first_partial: float | None = None
    final: float | None = None
    text: str = ""
    cancelled: bool = False
    error: str = ""


@dataclass
class Driver:
    client: BaseLanguageClient = field(
        default_factory=lambda: BaseLanguageClient("codevista-driver", "0.1"))
    partials: dict[str, Timing] = field(default_factory=dict)
    status: list[dict[str, Any]] = field(default_factory=list)
    on_partial: Callable[[str, str], None] | None = None
    version: int = 1

    async def start(self, init_options: dict[str, Any] | None = None) -> types.InitializeResult:
        c = self.client

        @c.feature(types.PROGRESS)
        def _progress(params: Any) -> None:
            value = params.value
            t = self.partials.get(str(params.token))
            if t is None or not isinstance(value, dict) or "items" not in value:
                return
            if t.first_partial is None:
                t.first_partial = time.perf_counter()
            t.text = value["items"][0]["insertText"] if value["items"] else ""
            if self.on_partial is not None:
                self.on_partial(str(params.token), t.text)

        @c.feature("codevista/status")
        def _status(params: Any) -> None:
            self.status.append({k: getattr(params, k, None) if not isinstance(params, dict)
                                else params.get(k) for k in ("state", "model", "message")})

        @c.feature(types.WINDOW_WORK_DONE_PROGRESS_CREATE)
        def _create(params: Any) -> None:
            return None

        await c.start_io(*SERVE)
        caps = types.ClientCapabilities(
            window=types.WindowClientCapabilities(work_done_progress=True),
            experimental={"codevista": {"streaming": True}})
        result = await c.initialize_async(types.InitializeParams(
            capabilities=caps, initialization_options=init_options or {}))
        c.initialized(types.InitializedParams())
        return result

    async def wait_ready(self, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in self.status:
                if s["state"] in ("ready", "error"):
                    return s
            await asyncio.sleep(0.02)
        raise TimeoutError("the server did not finish loading its model")

    def open(self, uri: str, text: str, language: str) -> None:
        self.client.text_document_did_open(types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(uri=uri, language_id=language,
                                                 version=self.version, text=text)))

    def insert(self, uri: str, line: int, character: int, text: str) -> None:
        self.version += 1
        pos = types.Position(line=line, character=character)
        self.client.text_document_did_change(types.DidChangeTextDocumentParams(
            text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=self.version),
            content_changes=[types.TextDocumentContentChangePartial(
                range=types.Range(start=pos, end=pos), text=text)]))

    def request(self, uri: str, line: int, character: int) -> tuple[str, asyncio.Future[Any]]:
        """Send a streamed inline-completion request; returns (id, future of the result)."""
        proto = self.client.protocol
        msg_id = str(uuid.uuid4())
        self.partials[msg_id] = Timing(sent=time.perf_counter())
        future: Future[Any] = Future()
        proto._request_futures[msg_id] = future
        proto._result_types[msg_id] = proto.get_result_type("textDocument/inlineCompletion")
        proto._send_data(JsonRPCRequestMessage(
            id=msg_id, method="textDocument/inlineCompletion", jsonrpc="2.0",
            params={"textDocument": {"uri": uri},
                    "position": {"line": line, "character": character},
                    "context": {"triggerKind": 2}, "partialResultToken": msg_id}))
        wrapped = asyncio.wrap_future(future)

        def done(f: asyncio.Future[Any]) -> None:
            t = self.partials[msg_id]
            t.final = time.perf_counter()
            if f.cancelled() or f.exception() is not None:
                t.cancelled = True
                t.error = "cancelled" if f.cancelled() else str(f.exception())
            elif f.result() is not None and f.result().items:
                t.text = f.result().items[0].insert_text
        wrapped.add_done_callback(done)
        return msg_id, wrapped

    def cancel(self, msg_id: str) -> None:
        self.client.protocol.notify("$/cancelRequest", types.CancelParams(id=msg_id))

    async def command(self, name: str) -> Any:
        return await self.client.workspace_execute_command_async(
            types.ExecuteCommandParams(command=name))

    async def stop(self) -> None:
        try:
            await asyncio.wait_for(self.client.shutdown_async(None), 10)
            self.client.exit(None)
        finally:
            await self.client.stop()
