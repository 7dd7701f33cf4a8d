"""The codevista language server (pygls): wiring only; features live in features/.

Protocol extensions (documented in README):
- streaming ghost text: a client advertising `experimental.codevista.streaming = true`
  may send a `partialResultToken` with `textDocument/inlineCompletion`; the server sends
  `$/progress {token, value: {items: [{insertText}], isIncomplete: true}}` (each value
  replaces the previous one) before the final response;
- `codevista/status` notifications: {state: loading|ready|error, model, message}.
- `codevista.translate` command: one argument object {uri, range?, targetLanguage,
  sourceLanguage?, partialResultToken?}; with a token, `$/progress {token, value: {text,
  isIncomplete: true}}` carries the translation so far (each value replaces the previous).
- `codevista.explainImage` command: one argument object {image: {uri | path | data,
  mimeType?}, question?, task?, partialResultToken?}; streams like translation.
- `codevista.generateImage` command: one argument object {prompt, size?, seed?, outputUri?,
  partialResultToken?}; progress values {text, rows, totalRows, isIncomplete} as rows of
  the image are decoded; result {uri, width, height, seed}. The PNG is written only inside
  a workspace folder.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import attrs
from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcServerNotInitialized,
)
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol, lsp_method

from .backend import LocalBackend
from .documents import PositionError, Snapshot, apply_changes, to_offset
from .errors import ArgumentError, DocumentNotOpenError, NotReadyError, to_jsonrpc
from .features.completion import CompletionService
from .features.generate_image import ImageService, resolve_output
from .features.translate import TranslationService
from .features.vision import OCR_MODEL, VisionService
from .settings import Settings, parse_settings
from .translation import other_language, resolve_language, suggested_file_name
from .vision import load_image, resolve_task

log = logging.getLogger(__name__)

VERSION = "0.1.0"
ACCEPT_COMMAND = "codevista.didAcceptCompletion"
STATS_COMMAND = "codevista.stats"
TRANSLATE_COMMAND = "codevista.translate"
EXPLAIN_IMAGE_COMMAND = "codevista.explainImage"
GENERATE_IMAGE_COMMAND = "codevista.generateImage"


@attrs.define
class StreamingInlineCompletionParams(types.InlineCompletionParams):
    """InlineCompletionParams plus the partialResultToken of our streaming extension."""

    partial_result_token: int | str | None = attrs.field(default=None)


@attrs.define
class StreamingInlineCompletionRequest(types.InlineCompletionRequest):
    params: StreamingInlineCompletionParams = attrs.field(kw_only=True)


_IGNORED = object()


class Protocol(LanguageServerProtocol):
    """Answers requests whose params do not fit their type with InvalidParams, where the
    stock protocol would drop them and leave the client waiting forever."""

    def get_message_type(self, method: str) -> Any:  # type: ignore[override]
        if method == types.TEXT_DOCUMENT_INLINE_COMPLETION:
            return StreamingInlineCompletionRequest
        return super().get_message_type(method)

    def structure_message(self, data: dict[str, Any]) -> Any:
        try:
            return super().structure_message(data)
        except JsonRpcException:
            if "jsonrpc" in data and "method" in data and "id" in data:
                self._send_response(data["id"], error=JsonRpcInvalidParams(
                    f"invalid params for {data['method']}").to_response_error())
                return _IGNORED
            if "jsonrpc" in data and "method" in data:  # a notification: no one to answer
                log.warning("notification %s with invalid params ignored", data["method"])
                return _IGNORED
            raise

    def handle_message(self, message: Any) -> None:
        if message is _IGNORED:
            return
        method, msg_id = getattr(message, "method", None), getattr(message, "id", None)
        # LSP: before `initialize`, requests get ServerNotInitialized and notifications
        # (but exit) are dropped; after `shutdown`, requests get InvalidRequest.
        if isinstance(method, str) and method not in (types.INITIALIZE, types.EXIT) and (
                self._workspace is None or self._shutdown):
            if msg_id is not None:
                error = (JsonRpcInvalidRequest("the server is shutting down") if self._shutdown
                         else JsonRpcServerNotInitialized("initialize first"))
                self._send_response(msg_id, error=error.to_response_error())
            else:
                log.warning("notification %s before initialize/after shutdown dropped", method)
            return
        super().handle_message(message)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams):
        """Changes apply strictly (LSP line ends, no clamping). A change for a document never
        opened, or whose range is not in the document, is refused whole and logged: the text
        stays as it was rather than silently drifting from the editor's."""
        uri = params.text_document.uri
        doc = self.workspace.text_documents.get(unquote(uri))
        if doc is None:
            log.warning("didChange for %s, which is not open, ignored", uri)
            return
        try:
            text = apply_changes(doc.source, params.content_changes, self._server.encoding)
        except PositionError as e:
            log.warning("didChange for %s refused (the document keeps version %s): %s", uri,
                        doc.version, e)
            return
        self.workspace.put_text_document(types.TextDocumentItem(
            uri=uri, language_id=doc.language_id or "", version=params.text_document.version,
            text=text))
        if (handler := self.fm.features.get(types.TEXT_DOCUMENT_DID_CHANGE)) is not None:
            yield handler, (params,), None

    # Commands run inside pygls' executeCommand handler as a task of their own, which a
    # `$/cancelRequest` does not reach: long commands register their task here by the
    # request id, and a cancellation cancels it too.
    command_tasks: dict[Any, asyncio.Task[Any]]

    def _handle_cancel_notification(self, msg_id: Any) -> None:
        task = getattr(self, "command_tasks", {}).pop(msg_id, None)
        if task is not None:
            task.cancel()
        super()._handle_cancel_notification(msg_id)

    def track_command(self) -> Any:
        """Register the running command's task under its request id; returns the id."""
        if not hasattr(self, "command_tasks"):
            self.command_tasks = {}
        msg_id, task = self.msg_id, asyncio.current_task()
        if msg_id is not None and task is not None:
            self.command_tasks[msg_id] = task
        return msg_id

    def untrack_command(self, msg_id: Any) -> None:
        if msg_id is not None:
            getattr(self, "command_tasks", {}).pop(msg_id, None)


class ResyncingReader:
    """stdin for the message reader. A header line must be exactly `Content-Length: N`; stray
    bytes before it (a frame without a header, a body shorter than announced) would make it,
    and the body after it, unreadable, and so every later frame: the line is read from its
    `Content-Length:` on instead, so a broken frame costs that frame only."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def readline(self) -> bytes:
        line = self.raw.readline()
        at = line.find(b"Content-Length:")
        if at > 0:
            log.warning("skipped %d stray bytes before a message header", at)
            line = line[at:]
        return line

    def read(self, n: int) -> bytes:
        return self.raw.read(n)


class CodevistaServer(LanguageServer):
    def start_io(self, stdin: Any = None, stdout: Any = None) -> None:
        import sys

        super().start_io(ResyncingReader(stdin or sys.stdin.buffer), stdout)

    def __init__(self) -> None:
        super().__init__("codevista", VERSION, protocol_cls=Protocol)
        self.settings = Settings()
        self.backend = LocalBackend()
        self.completions = CompletionService(self.backend, lambda: self.settings)
        self.translations = TranslationService(self.backend)
        self.vision = VisionService()
        self.images = ImageService()
        self.accepted = 0
        self.load_task: asyncio.Task[None] | None = None
        self.edited: dict[str, float] = {}  # uri -> last open/edit time
        self.init_options: Any = None  # initializationOptions, applied once initialized

    # -- helpers -------------------------------------------------------------------------
    def image_roots(self) -> list[Path]:
        """Folders images may be read from: the workspace's and those allowed in settings."""
        roots = [Path(p).expanduser() for p in self.settings.allowed_image_roots]
        for folder in self.workspace.folders.values():
            if folder.uri.startswith("file:"):
                roots.append(Path(unquote(urlparse(folder.uri).path)))
        if not self.workspace.folders and self.workspace.root_path:
            roots.append(Path(self.workspace.root_path))
        return roots

    @property
    def encoding(self) -> str:
        enc = self.workspace.position_encoding or types.PositionEncodingKind.Utf16
        return str(enc.value if hasattr(enc, "value") else enc)

    def streaming_client(self) -> bool:
        exp = self.client_capabilities.experimental
        return isinstance(exp, dict) and bool((exp.get("codevista") or {}).get("streaming"))

    def snapshot(self, uri: str, position: types.Position) -> Snapshot:
        if unquote(uri) not in self.workspace.text_documents:  # keyed by the decoded URI
            raise DocumentNotOpenError(f"document {uri} is not open")
        doc = self.workspace.get_text_document(uri)
        offset = to_offset(doc.source, position.line, position.character, self.encoding)
        return Snapshot(uri=uri, version=doc.version, text=doc.source,
                        language_id=doc.language_id or "", offset=offset)

    def other_documents(self, uri: str, language_id: str) -> list[tuple[str, str]]:
        """Other open documents of the same language, most recently edited first."""
        docs = self.workspace.text_documents
        order = sorted((u for u in self.edited if u != uri and unquote(u) in docs),
                       key=lambda u: -self.edited[u])
        return [(u, docs[unquote(u)].source) for u in order
                if docs[unquote(u)].language_id == language_id]

    def status(self, message: str = "") -> None:
        b = self.backend
        self.protocol.notify("codevista/status", {
            "state": b.state, "model": b.model_name, "message": message or (b.error or "")})

    def apply_settings(self, raw: Any) -> None:
        new, errors = parse_settings(raw, self.settings)
        for e in errors:
            self.window_show_message(types.ShowMessageParams(
                type=types.MessageType.Warning, message=f"codevista: {e}"))
        old, self.settings = self.settings, new
        if new.backend != old.backend:
            self.switch_backend()
        if (new.model_path, new.dtype, new.backend) != (old.model_path, old.dtype,
                                                         old.backend) or self.load_task is None:
            self.start_load()

    def switch_backend(self) -> None:
        """The in-process engine or a remote server, by the `backend` setting."""
        self.backend.close()
        if self.settings.backend == "local":
            self.backend = LocalBackend()
        else:
            from .remote import OpenAIBackend, RemoteConfig

            self.backend = OpenAIBackend(RemoteConfig.from_setting(self.settings.backend))
        self.completions.backend = self.backend
        self.translations.backend = self.backend

    def start_load(self) -> None:
        if self.load_task is not None and not self.load_task.done():
            self.load_task.cancel()
        self.load_task = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        token = str(uuid.uuid4())
        progress = False
        window = self.client_capabilities.window
        if window is not None and window.work_done_progress:
            try:
                await self.work_done_progress.create_async(token)
                progress = True
            except Exception:  # the client declined: status notifications still go out
                log.info("client refused a progress token")

        def report(message: str) -> None:
            if progress:
                self.work_done_progress.report(token, types.WorkDoneProgressReport(
                    message=message))
            self.status(message)

        if progress:
            self.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                title="codevista", message="loading model", cancellable=False))
        await self.backend.load(self.settings.model_path, self.settings.dtype, report)
        if progress:
            self.work_done_progress.end(token, types.WorkDoneProgressEnd(
                message=self.backend.state))
        self.status()
        if self.backend.state == "error":
            self.window_show_message(types.ShowMessageParams(
                type=types.MessageType.Error,
                message=f"codevista: the model could not be loaded: {self.backend.error}"))


server = CodevistaServer()


@server.feature(types.INITIALIZED)
def initialized(ls: CodevistaServer, params: types.InitializedParams) -> None:
    ls.apply_settings(ls.init_options)


@server.feature(types.INITIALIZE)
def initialize(ls: CodevistaServer, params: types.InitializeParams) -> None:
    ls.init_options = params.initialization_options


@server.feature(types.TEXT_DOCUMENT_DID_OPEN)
def did_open(ls: CodevistaServer, params: types.DidOpenTextDocumentParams) -> None:
    ls.edited[params.text_document.uri] = time.monotonic()


@server.feature(types.TEXT_DOCUMENT_DID_CHANGE)
def did_change(ls: CodevistaServer, params: types.DidChangeTextDocumentParams) -> None:
    ls.edited[params.text_document.uri] = time.monotonic()


@server.feature(types.TEXT_DOCUMENT_DID_CLOSE)
def did_close(ls: CodevistaServer, params: types.DidCloseTextDocumentParams) -> None:
    ls.edited.pop(params.text_document.uri, None)
    ls.completions.shown.pop(params.text_document.uri, None)


@server.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)
def did_change_configuration(ls: CodevistaServer,
                             params: types.DidChangeConfigurationParams) -> None:
    ls.apply_settings(params.settings)


@server.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION, types.InlineCompletionOptions())
async def inline_completion(ls: CodevistaServer, params: StreamingInlineCompletionParams
                            ) -> types.InlineCompletionList | None:
    try:
        uri = params.text_document.uri
        sel = params.context.selected_completion_info if params.context else None
        if sel is not None:
            # The user has a completion item selected: continue after its text.
            snap = ls.snapshot(uri, sel.range.start)
            end = ls.snapshot(uri, sel.range.end).offset
            snap = Snapshot(uri, snap.version, snap.prefix + sel.text + snap.text[end:],
                            snap.language_id, snap.offset + len(sel.text))
            rng, lead = sel.range, sel.text
        else:
            snap = ls.snapshot(uri, params.position)
            rng, lead = types.Range(params.position, params.position), ""
        if not ls.settings.language_enabled(snap.language_id):
            return None
        token = params.partial_result_token if ls.streaming_client() else None

        def on_partial(text: str) -> None:
            if token is not None:
                ls.progress(types.ProgressParams(token=token, value={
                    "items": [{"insertText": lead + text}], "isIncomplete": True}))

        text = await ls.completions.complete(
            snap, on_partial, others=ls.other_documents(uri, snap.language_id))
    except asyncio.CancelledError:
        raise
    except Exception as e:
        raise to_jsonrpc(e) from e
    if text is None:
        ls.status("the model is not ready")
        return None
    if not text:
        return types.InlineCompletionList(items=[])
    return types.InlineCompletionList(items=[
        types.InlineCompletionItem(insert_text=lead + text, range=rng)])


@server.feature(types.TEXT_DOCUMENT_COMPLETION,
                types.CompletionOptions(trigger_characters=[".", "(", " "]))
async def completion(ls: CodevistaServer, params: types.CompletionParams
                     ) -> types.CompletionList | None:
    """Fallback for clients without inline completion: one item holding the suggestion."""
    try:
        snap = ls.snapshot(params.text_document.uri, params.position)
        if not ls.settings.language_enabled(snap.language_id):
            return None
        text = await ls.completions.complete(
            snap, others=ls.other_documents(snap.uri, snap.language_id))
    except asyncio.CancelledError:
        raise
    except Exception as e:
        raise to_jsonrpc(e) from e
    if not text:
        return None
    first = text.split("\n", 1)[0].strip() or text.strip()
    return types.CompletionList(is_incomplete=True, items=[types.CompletionItem(
        label=first[:60], kind=types.CompletionItemKind.Snippet, detail="codevista",
        insert_text=text, insert_text_format=types.InsertTextFormat.PlainText,
        sort_text="0")])


@server.command(ACCEPT_COMMAND)
def did_accept(ls: CodevistaServer, *args: Any) -> None:
    """Acceptance events stay in this process (counted, logged); nothing leaves it."""
    ls.accepted += 1
    log.info("completion accepted (%d so far)", ls.accepted)


@server.command(STATS_COMMAND)
def stats(ls: CodevistaServer, *args: Any) -> dict[str, Any]:
    return {**ls.completions.stats.as_dict(), "accepted": ls.accepted,
            "model": ls.backend.model_name, "state": ls.backend.state}


def _translate_args(ls: CodevistaServer, args: tuple[Any, ...]) -> dict[str, Any]:
    if len(args) != 1 or not isinstance(args[0], dict):
        raise ArgumentError(f"{TRANSLATE_COMMAND} takes one object {{uri, range?, "
                            "targetLanguage, sourceLanguage?, partialResultToken?}")
    arg = args[0]
    uri = arg.get("uri")
    if not isinstance(uri, str):
        raise ArgumentError(f"{TRANSLATE_COMMAND}: 'uri' must be a string")
    if unquote(uri) not in ls.workspace.text_documents:
        raise DocumentNotOpenError(f"document {uri} is not open")
    target = resolve_language(arg.get("targetLanguage"))
    doc = ls.workspace.get_text_document(uri)
    src_id = arg.get("sourceLanguage") or doc.language_id or ""
    if not isinstance(src_id, str):
        raise ArgumentError(f"{TRANSLATE_COMMAND}: 'sourceLanguage' must be a string")
    source = other_language(src_id)
    text = doc.source
    rng = arg.get("range")
    if rng is not None:
        try:
            start, end = rng["start"], rng["end"]
            a = to_offset(text, start["line"], start["character"], ls.encoding)
            b = to_offset(text, end["line"], end["character"], ls.encoding)
        except (KeyError, TypeError) as e:
            raise ArgumentError(f"{TRANSLATE_COMMAND}: 'range' must be an LSP Range") from e
        if a > b:
            a, b = b, a
        if a < b:  # an empty selection means the whole document
            text = text[a:b]
    return {"uri": uri, "text": text, "source": source, "target": target}


def streaming_command(name: str):
    """A long command: cancellable by `$/cancelRequest`, its errors turned into JSON-RPC
    errors, and an `on_partial(text)` that reports `{text, isIncomplete}` progress to the
    argument object's `partialResultToken` (if any)."""
    def wrap(fn):
        @server.command(name)
        async def handler(ls: CodevistaServer, *args: Any) -> dict[str, Any]:
            protocol: Protocol = ls.protocol  # type: ignore[assignment]
            request = protocol.track_command()
            arg = args[0] if len(args) == 1 and isinstance(args[0], dict) else {}
            token = arg.get("partialResultToken")

            def on_partial(text: str, **extra: Any) -> None:
                if token is not None:
                    ls.progress(types.ProgressParams(token=token, value={
                        "text": text, **extra, "isIncomplete": True}))

            try:
                if token is not None and not isinstance(token, str | int):
                    raise ArgumentError(f"{name}: 'partialResultToken' must be a string or "
                                        "an integer")
                return await fn(ls, args, on_partial)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                raise to_jsonrpc(e) from e
            finally:
                protocol.untrack_command(request)
        handler.__name__ = handler.__qualname__ = fn.__name__
        handler.__doc__ = fn.__doc__
        return handler
    return wrap


@streaming_command(TRANSLATE_COMMAND)
async def translate(ls: CodevistaServer, args: tuple[Any, ...], on_partial
                    ) -> dict[str, Any]:
    """Translate a selection (or the whole document) into another language, streamed."""
    a = _translate_args(ls, args)
    if ls.backend.state != "ready":
        raise NotReadyError(f"the model is not ready ({ls.backend.state}"
                            f"{': ' + ls.backend.error if ls.backend.error else ''})")
    result = await ls.translations.translate(a["text"], a["source"], a["target"],
                                             on_partial)
    return {"text": result.text, "targetLanguage": a["target"].id,
            "sourceLanguage": a["source"].id,
            "suggestedFileName": suggested_file_name(a["uri"], a["target"]),
            "pieces": result.pieces}


@streaming_command(EXPLAIN_IMAGE_COMMAND)
async def explain_image(ls: CodevistaServer, args: tuple[Any, ...], on_partial
                        ) -> dict[str, Any]:
    """Explain, describe, transcribe or locate in an image, with the vision model."""
    if len(args) != 1 or not isinstance(args[0], dict):
        raise ArgumentError(f"{EXPLAIN_IMAGE_COMMAND} takes one object {{image, question?, "
                            "task?, partialResultToken?}")
    arg = args[0]
    task = resolve_task(arg.get("task"))
    question = arg.get("question")
    if question is not None and not isinstance(question, str):
        raise ArgumentError("'question' must be a string")
    img, source = await asyncio.to_thread(load_image, arg.get("image"), ls.image_roots())
    remote = getattr(getattr(ls.backend, "cfg", None), "vision_model", None)
    if task == "transcribe":  # read by OCR alone: no vision model needed
        answer = await ls.vision.transcribe(img, on_partial)
        model = OCR_MODEL
    elif remote:  # a served vision-language model (the remote backend's visionModel)
        if ls.backend.state != "ready":
            raise NotReadyError(f"the remote backend is not ready ({ls.backend.state}"
                                f"{': ' + ls.backend.error if ls.backend.error else ''})")
        answer = await ls.vision.explain_remote(ls.backend, img, task, question, on_partial,
                                                ls.settings.vision_max_tokens)
        model = remote
    else:
        backend = await ls.vision.ensure(ls.settings.vision_model_path,
                                         lambda m: ls.status(f"vision model: {m}"))
        answer = await ls.vision.explain(backend, img, task, question, on_partial,
                                         ls.settings.vision_max_tokens)
        model = ls.vision.backend.model_name
    out: dict[str, Any] = {"text": answer.text, "task": task, "image": source.label,
                           "model": model}
    if task == "locate":
        out["boxes"] = answer.boxes
    out.update(answer.ocr_fields())  # transcription, language, lines (when OCR ran)
    return out


@streaming_command(GENERATE_IMAGE_COMMAND)
async def generate_image(ls: CodevistaServer, args: tuple[Any, ...], on_partial
                         ) -> dict[str, Any]:
    """Draw a PNG from a description with the text-to-image model, inside the workspace."""
    if len(args) != 1 or not isinstance(args[0], dict):
        raise ArgumentError(f"{GENERATE_IMAGE_COMMAND} takes one object {{prompt, size?, "
                            "seed?, guidance?, outputUri?, partialResultToken?}")
    arg = args[0]
    prompt, seed = arg.get("prompt"), arg.get("seed", 0)
    if not isinstance(prompt, str) or not prompt.strip():
        raise ArgumentError("'prompt' must be a non-empty string")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ArgumentError("'seed' must be a non-negative integer")
    guidance = arg.get("guidance")
    if guidance is not None:
        from codevista.models.errors import RequestError
        from codevista.models.vision.t2i import check_guidance

        try:
            check_guidance(guidance)
        except RequestError as e:
            raise ArgumentError(f"'guidance': {e}") from e
    roots = [Path(unquote(urlparse(f.uri).path)) for f in ls.workspace.folders.values()
             if f.uri.startswith("file:")]
    if not roots and ls.workspace.root_path:
        roots.append(Path(ls.workspace.root_path))
    out = resolve_output(arg.get("outputUri"), prompt, seed, roots)
    model = await ls.images.ensure(None, lambda m: ls.status(f"image model: {m}"))
    result = await ls.images.generate(
        model, prompt, out, arg.get("size"), seed,
        lambda done, total: on_partial(f"{done}/{total} rows", rows=done, totalRows=total),
        guidance)
    return {"uri": result.path.as_uri(), "width": result.width, "height": result.height,
            "seed": result.seed}


@server.feature(types.SHUTDOWN)
def shutdown(ls: CodevistaServer, *args: Any) -> None:
    ls.backend.close()
    ls.vision.close()
    ls.images.close()
