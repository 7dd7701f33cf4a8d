"""Document state under hostile edits: every `didChange` the server accepts leaves exactly the
text a reference model computes, and every impossible one (a range past the end, inside a
surrogate pair or a UTF-8 sequence, start after end, a document never opened, negative or
mistyped numbers) leaves the document as it was.

The reference model works on the encoded code units themselves (UTF-16 units, UTF-8 bytes,
code points) and shares no code with server/documents.py. The server side runs in-process
through the real protocol class (structure, handle, the strict didChange), which is what the
stdio process runs too (tests/e2e/test_fuzz_protocol.py drives that one over a pipe)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from codevista.server.documents import PositionError, apply_changes
from hypothesis import given, settings
from hypothesis import strategies as st

PIECES = ["a", "b", " ", "é", "日", "🎉", "😀", "\n", "\r\n", "\r", "\t",
          "\u2028", "\x0c", "\x85"]  # the last three are line breaks to Python, not to LSP
texts = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)
ENCODINGS = ["utf-16", "utf-8", "utf-32"]
CODEC = {"utf-16": "utf-16-le", "utf-8": "utf-8", "utf-32": "utf-32-le"}
WIDTH = {"utf-16": 2, "utf-8": 1, "utf-32": 4}


class Reference:
    """A document as a list of code units of one encoding."""

    def __init__(self, text: str, encoding: str) -> None:
        self.encoding = encoding
        data = text.encode(CODEC[encoding])
        w = WIDTH[encoding]
        self.units = [int.from_bytes(data[i:i + w], "little") for i in range(0, len(data), w)]

    @property
    def text(self) -> str:
        w = WIDTH[self.encoding]
        return b"".join(u.to_bytes(w, "little") for u in self.units).decode(CODEC[self.encoding])

    def lines(self) -> list[tuple[int, int]]:
        """(start, end of content) per line; CR, LF and CR LF end a line, nothing else."""
        out, start, i, u = [], 0, 0, self.units
        while i < len(u):
            if u[i] in (0x0D, 0x0A):
                out.append((start, i))
                i += 2 if u[i] == 0x0D and i + 1 < len(u) and u[i + 1] == 0x0A else 1
                start = i
            else:
                i += 1
        out.append((start, len(u)))
        return out

    def _continuation(self, unit: int) -> bool:
        if self.encoding == "utf-16":
            return 0xDC00 <= unit <= 0xDFFF
        if self.encoding == "utf-8":
            return 0x80 <= unit <= 0xBF
        return False

    def offset(self, line: int, character: int) -> int | None:
        lines = self.lines()
        if not 0 <= line < len(lines) or character < 0:
            return None
        start, end = lines[line]
        at = start + character
        if at > end or (at < len(self.units) and self._continuation(self.units[at])):
            return None
        return at

    def apply(self, changes: list[dict[str, Any]]) -> bool:
        """Apply all or nothing; False if any range is impossible."""
        units = list(self.units)
        for ch in changes:
            if "range" not in ch:
                self.units = Reference(ch["text"], self.encoding).units
                continue
            s, e = ch["range"]["start"], ch["range"]["end"]
            a = self.offset(s["line"], s["character"])
            b = self.offset(e["line"], e["character"])
            if a is None or b is None or a > b:
                self.units = units
                return False
            self.units[a:b] = Reference(ch["text"], self.encoding).units
        return True


@st.composite
def change(draw, ref: Reference) -> dict[str, Any]:
    if draw(st.integers(0, 9)) == 0:
        return {"text": draw(texts)}  # a whole-document change
    lines = ref.lines()
    width = max(e - s for s, e in lines) + 2

    def pos() -> dict[str, int]:
        return {"line": draw(st.integers(-1, len(lines))),
                "character": draw(st.integers(-1, width))}
    return {"range": {"start": pos(), "end": pos()}, "text": draw(texts)}


class _Range:
    def __init__(self, r: dict[str, Any]) -> None:
        self.start = type("P", (), r["start"])
        self.end = type("P", (), r["end"])


class _Change:
    def __init__(self, c: dict[str, Any]) -> None:
        self.text = c["text"]
        self.range = _Range(c["range"]) if "range" in c else None


@pytest.mark.parametrize("encoding", ENCODINGS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_apply_changes_matches_the_reference_model(encoding, data):
    text = data.draw(texts)
    ref = Reference(text, encoding)
    assert ref.text == text
    for _ in range(data.draw(st.integers(1, 4))):
        changes = [data.draw(change(ref)) for _ in range(data.draw(st.integers(1, 2)))]
        before = ref.text
        ok = ref.apply(changes)
        try:
            got = apply_changes(before, [_Change(c) for c in changes], encoding)
        except PositionError:
            got = None
        assert (got is not None) == ok, (before, changes)
        if ok:
            assert got == ref.text


# -- the server's protocol, in process ------------------------------------------------------

class _Writer:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self.sent.append(json.loads(data.split(b"\r\n\r\n", 1)[1]))

    def close(self) -> None:
        pass


def _server(encoding: str):
    from codevista.server.app import CodevistaServer

    ls = CodevistaServer()
    writer = _Writer()
    ls.protocol.set_writer(writer)
    ls.protocol.writer_for_test = writer  # type: ignore[attr-defined]

    def feed(obj: Any) -> None:
        proto = ls.protocol
        proto.handle_message(json.loads(json.dumps(obj), object_hook=proto.structure_message))

    feed({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "processId": None, "rootUri": None,
        "capabilities": {"general": {"positionEncodings": [encoding]}}}})
    return ls, feed


def _notify(method: str, params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


_SERVERS: dict[str, Any] = {}
_URIS = iter(range(1 << 30))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_server_documents_follow_the_reference_model(encoding, data):
    if encoding not in _SERVERS:  # one server per encoding; each example its own document
        loop = asyncio.new_event_loop()
        _SERVERS[encoding] = loop, loop.run_until_complete(_async(_server, encoding))
    loop, (ls, feed) = _SERVERS[encoding]
    assert ls.encoding == encoding
    n = next(_URIS)
    uri = f"file:///w%20s/a{n}.py"  # percent-encoded, as VS Code sends a path with a space
    text = data.draw(texts)
    feed(_notify("textDocument/didOpen", {"textDocument": {
        "uri": uri, "languageId": "python", "version": 1, "text": text}}))
    ref, version = Reference(text, encoding), 1
    for step in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["edit", "edit", "edit", "never_opened",
                                          "negative", "mistyped"]))
        changes = [data.draw(change(ref)) for _ in range(data.draw(st.integers(1, 3)))]
        target = uri
        if kind == "never_opened":
            target = f"file:///never/opened{n}.py"
        elif kind == "negative":
            changes = [{"range": {"start": {"line": -1, "character": 0},
                                  "end": {"line": 0, "character": 0}}, "text": "x"}]
        elif kind == "mistyped":
            changes = [{"range": {"start": {"line": "0", "character": 0},
                                  "end": {"line": 0, "character": None}}, "text": 5}]
        loop.run_until_complete(_async(feed, _notify("textDocument/didChange", {
            "textDocument": {"uri": target, "version": version + 1},
            "contentChanges": changes})))
        if kind == "edit" and ref.apply(changes):
            version += 1
        docs = ls.workspace.text_documents
        assert f"file:///never/opened{n}.py" not in docs
        doc = docs[f"file:///w s/a{n}.py"]
        assert doc.source == ref.text, (step, kind, changes)
        assert doc.version == version
    errors = [m for m in ls.protocol.writer_for_test.sent
              if m.get("method") == "window/showMessage"]
    assert errors == []  # refused changes are logged, not thrown at the user
    feed(_notify("textDocument/didClose", {"textDocument": {"uri": uri}}))


async def _async(fn, *args):
    return fn(*args)
