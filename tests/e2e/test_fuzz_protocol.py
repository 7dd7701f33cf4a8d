"""The real `codevista serve` process fed hostile bytes over stdio: broken frames, invalid
JSON, wrong field types (hypothesis), unknown methods, requests before `initialize`,
duplicate ids, huge payloads, impossible positions and edits. Each gets a JSON-RPC error
or is ignored as the protocol says; the next valid request is always served; stdout only
ever carries well-formed frames; document state follows a reference model of the text.

Hypothesis runs are bounded by max_examples (the whole module takes well under a minute)."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawlsp import RawServer, frame

INVALID_PARAMS, INTERNAL, NOT_FOUND, NOT_INITIALIZED = -32602, -32603, -32601, -32002
FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _serving(s: RawServer) -> None:
    assert s.proc.poll() is None, s.log_tail()
    assert s.alive_and_serving(), s.log_tail()
    assert s.unparsable == []  # stdout carried nothing but protocol frames


@pytest.fixture(scope="module")
def model_server(qwen_dir):
    """A server with a (tiny) model loaded: valid requests run the engine."""
    s = RawServer()
    s.initialize({"modelPath": str(qwen_dir), "maxTokens": 8})
    assert s.wait_status()["state"] == "ready"
    yield s
    assert s.close() == 0  # a clean exit after all that


def _probe_server(encoding: str):
    """No model (the path does not exist): a completion at a valid position answers null at
    once, an impossible one InvalidParams; thousands of probes cost a few seconds."""
    s = RawServer(log_level="WARNING")
    result = s.initialize({"modelPath": "/nonexistent/model"}, encodings=[encoding])
    assert result["result"]["capabilities"]["positionEncoding"] == encoding
    assert s.wait_status()["state"] == "error"
    return s


@pytest.fixture(scope="module", params=["utf-16", "utf-8"])
def probe_server(request):
    s = _probe_server(request.param)
    s.encoding = request.param  # type: ignore[attr-defined]
    yield s
    assert s.close() == 0


# -- before initialize ----------------------------------------------------------------------

def test_requests_before_initialize_are_refused_and_notifications_dropped():
    with RawServer() as s:
        s.open("file:///early.py", "x = 1\n")
        r = s.inline("file:///early.py", 0, 0)
        assert r["error"]["code"] == NOT_INITIALIZED
        r = s.request("workspace/executeCommand", {"command": "codevista.stats"})
        assert r["error"]["code"] == NOT_INITIALIZED
        assert s.notifications("window/showMessage") == []  # the early didOpen was dropped
        s.initialize({"modelPath": "/nonexistent/model"})
        s.wait_status()
        assert s.inline("file:///early.py", 0, 0)["error"]["code"] == INVALID_PARAMS  # not open
        _serving(s)


def test_requests_after_shutdown_are_refused_and_exit_ends_the_process():
    s = RawServer()
    s.initialize({"modelPath": "/nonexistent/model"})
    assert s.request("shutdown")["result"] is None
    assert s.request("workspace/executeCommand", {"command": "codevista.stats"}
                     )["error"]["code"] == -32600
    s.notify("exit")
    assert s.proc.wait(10) == 0
    s.close()


# -- frames and JSON ------------------------------------------------------------------------

MALFORMED = {
    "invalid_json": frame(b"{not json"),
    "truncated_json": frame(b'{"jsonrpc": "2.0", "id": 1, "method": "initia'),
    "json_array": frame(b"[]"),
    "batch": frame(json.dumps([{"jsonrpc": "2.0", "id": 900, "method": "shutdown"}])),
    "json_number": frame(b"42"),
    "json_string": frame(b'"hello"'),
    "json_null": frame(b"null"),
    "no_jsonrpc_field": frame(json.dumps({"id": 901, "method": "shutdown"})),
    "wrong_jsonrpc_version": frame(json.dumps({"jsonrpc": "1.0", "id": 902,
                                               "method": "shutdown"})),
    "invalid_utf8": frame(b'{"jsonrpc": "2.0", "method": "\xff\xfe"}'),
    "nul_bytes": frame(b"\x00" * 64),
    "bad_content_length_line": b"Content-Length: lots\r\n\r\n",
    "unknown_header_only": b"X-Whatever: 1\r\n\r\n",
    "zero_length": b"Content-Length: 0\r\n\r\n",
    "extra_headers": (b"Content-Type: application/vscode-jsonrpc; charset=utf-8\r\n"
                      + frame(json.dumps({"jsonrpc": "2.0", "method": "$/noop"}))),
    "method_not_a_string": frame(json.dumps({"jsonrpc": "2.0", "id": 903, "method": 5})),
    "id_an_object": frame(json.dumps({"jsonrpc": "2.0", "id": {"a": 1},
                                      "method": "workspace/executeCommand",
                                      "params": {"command": "codevista.stats"}})),
    "response_nobody_asked_for": frame(json.dumps({"jsonrpc": "2.0", "id": 424242,
                                                   "result": {"x": 1}})),
    "error_response_nobody_asked_for": frame(json.dumps(
        {"jsonrpc": "2.0", "id": 424243, "error": {"code": 1, "message": "?"}})),
    "params_an_array": frame(json.dumps({"jsonrpc": "2.0", "id": 904,
                                         "method": "textDocument/inlineCompletion",
                                         "params": [1, 2, 3]})),
    "nested_message_in_params": frame(json.dumps(
        {"jsonrpc": "2.0", "id": 905, "method": "workspace/executeCommand",
         "params": {"command": "codevista.stats",
                    "arguments": [{"jsonrpc": "2.0", "method": "exit"}]}})),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_messages_never_take_the_server_down(model_server, case):
    s = model_server
    s.send_bytes(MALFORMED[case])
    _serving(s)
    ids = {"method_not_a_string": 903, "params_an_array": 904}
    if case in ids:  # a request whose id could be read: it gets an error, not silence
        assert s.response(ids[case], 5)["error"]["code"] == INVALID_PARAMS
    if case in ("batch", "no_jsonrpc_field", "wrong_jsonrpc_version"):  # never executed
        assert s.no_response({"batch": 900, "no_jsonrpc_field": 901,
                              "wrong_jsonrpc_version": 902}[case], 0.3)
    if case == "nested_message_in_params":
        assert s.response(905, 5)  # answered: the nested "exit" was not obeyed


def test_a_broken_frame_costs_only_itself(model_server):
    """Bytes without a header, or a body shorter than its Content-Length, run into the next
    frame's header line; the reader picks the header up from there, so the stream recovers
    at once instead of losing every later frame."""
    s = model_server
    stats = {"command": "codevista.stats"}
    s.send_bytes(b"garbage without a line end")
    assert "result" in s.request("workspace/executeCommand", stats, timeout=5)
    s.send_bytes(b"Content-Length: 30\r\n\r\n" + b'{"jsonrpc": "2.0"')  # 13 bytes short
    eaten = s.send_request("workspace/executeCommand", stats)  # its header completes the body
    assert "result" in s.request("workspace/executeCommand", stats, timeout=5)
    assert s.no_response(eaten, 0.2)
    _serving(s)


# -- unknown methods, duplicate ids, huge payloads -------------------------------------------

def test_unknown_methods(model_server):
    s = model_server
    assert s.request("codevista/noSuchMethod", {"x": 1})["error"]["code"] == NOT_FOUND
    assert s.request("textDocument/hover", {"textDocument": {"uri": "file:///a.py"},
                                            "position": {"line": 0, "character": 0}}
                     )["error"]["code"] == NOT_FOUND
    r = s.request("workspace/executeCommand", {"command": "codevista.noSuchCommand"})
    assert "error" in r
    n = len(s.messages)
    s.notify("codevista/noSuchNotification", {"x": 1})
    s.notify("$/somethingOptional", {})
    _serving(s)
    assert [m for m in s.messages[n:] if "id" not in m or m.get("error")] == []


def test_duplicate_ids_each_get_an_answer(model_server):
    s = model_server
    s.open("file:///dup1.py", "def f(x):\n    return ")
    s.open("file:///dup2.py", "class A:\n    ")
    for uri, line, char in (("file:///dup1.py", 1, 11), ("file:///dup2.py", 1, 4)):
        s.send_request("textDocument/inlineCompletion", {
            "textDocument": {"uri": uri}, "position": {"line": line, "character": char},
            "context": {"triggerKind": 1}}, msg_id="same")
    s.send_request("workspace/executeCommand", {"command": "codevista.stats"}, msg_id="same")
    got = [s.response("same", 30) for _ in range(3)]
    assert all("result" in r or r["error"]["code"] == -32800 for r in got), got
    _serving(s)


def test_huge_document_and_huge_request(model_server):
    """8 MB files (many lines; one line) are accepted; completions inside them stay within
    the model's context budget and answer promptly; an 8 MB argument gets an error."""
    s = model_server
    many = "".join(f"value_{i} = compute({i}, 'abc')\n" for i in range(250_000))
    one_line = "x = [" + "1, " * 2_700_000
    for uri, text in (("file:///huge.py", many), ("file:///oneline.py", one_line)):
        s.open(uri, text)
        lines = text.split("\n")
        t0 = time.monotonic()
        r = s.inline(uri, len(lines) - 1, len(lines[-1]), timeout=60)
        assert "result" in r, r
        assert time.monotonic() - t0 < 30
        mid = s.inline(uri, len(lines) // 2, 0, timeout=60)
        assert "result" in mid, mid
    r = s.request("workspace/executeCommand", {"command": "codevista.translate",
                                               "arguments": [{"uri": "x" * 8_000_000}]})
    assert r["error"]["code"] == INVALID_PARAMS and len(json.dumps(r)) < 2000  # not echoed
    _serving(s)


# -- wrong types (hypothesis) ----------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)

VALID = {
    "textDocument/inlineCompletion": {"textDocument": {"uri": "file:///fz.py"},
                                      "position": {"line": 0, "character": 4},
                                      "context": {"triggerKind": 1}},
    "textDocument/completion": {"textDocument": {"uri": "file:///fz.py"},
                                "position": {"line": 0, "character": 4}},
    "workspace/executeCommand": {"command": "codevista.translate",
                                 "arguments": [{"uri": "file:///fz.py",
                                                "targetLanguage": "java"}]},
}
NOTIFICATIONS = ["textDocument/didOpen", "textDocument/didChange", "textDocument/didClose",
                 "workspace/didChangeConfiguration", "$/cancelRequest", "initialized",
                 "$/setTrace", "window/workDoneProgress/cancel"]
COMMANDS = ["codevista.translate", "codevista.explainImage", "codevista.stats",
            "codevista.didAcceptCompletion"]


def _mutate(value: Any, path: list[Any], new: Any) -> Any:
    if not path:
        return new
    if isinstance(value, dict):
        return {**value, path[0]: _mutate(value.get(path[0]), path[1:], new)}
    if isinstance(value, list) and isinstance(path[0], int) and path[0] < len(value):
        out = list(value)
        out[path[0]] = _mutate(out[path[0]], path[1:], new)
        return out
    return new


def _paths(value: Any, prefix: list[Any] | None = None) -> list[list[Any]]:
    prefix = prefix or []
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + [k])
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + [i])
    return out


@st.composite
def requests(draw) -> tuple[str, Any]:
    method = draw(st.sampled_from(list(VALID)))
    base = VALID[method]
    if method == "workspace/executeCommand":
        base = {**base, "command": draw(st.sampled_from(COMMANDS))}
    how = draw(st.sampled_from(["field", "field", "whole", "drop"]))
    if how == "whole":
        return method, draw(json_values)
    path = draw(st.sampled_from(_paths(base)[1:]))
    if how == "drop":
        parent: Any = base
        for key in path[:-1]:
            parent = parent[key]
        trimmed = ({k: v for k, v in parent.items() if k != path[-1]}
                   if isinstance(parent, dict) else parent[:-1])
        return method, _mutate(base, path[:-1], trimmed)
    return method, _mutate(base, path, draw(json_values))


OUTCOMES: Counter[Any] = Counter()  # printed by the test after this one (run with -s)


@FUZZ
@given(msgs=st.lists(st.one_of(requests(), st.tuples(st.sampled_from(NOTIFICATIONS),
                                                      json_values)), min_size=1, max_size=4))
def test_wrong_field_types_get_an_error_or_are_ignored(model_server, msgs):
    s = model_server
    s.open("file:///fz.py", "def f(x):\n    return x\n")
    sent = []
    for method, params in msgs:
        if method in VALID:
            sent.append(s.send_request(method, params))
        else:
            s.notify(method, params)
    for msg_id in sent:
        r = s.response(msg_id, 30)
        OUTCOMES[r["error"]["code"] if "error" in r else "result"] += 1
        if "error" in r:
            assert r["error"]["code"] in (INVALID_PARAMS, INTERNAL, -32800), r
            assert "Traceback" not in r["error"]["message"]
    _serving(s)


def test_fuzzed_outcomes_summary():
    print("\nFUZZED REQUESTS", dict(OUTCOMES))
    assert OUTCOMES.get(INTERNAL, 0) == 0 or not OUTCOMES  # wrong types are InvalidParams


# -- positions and edits against a reference model -------------------------------------------

PIECES = ["a", "é", "日", "🎉", " ", "\t", "\n", "\r\n", "\r", "\u2028", "\x0c"]
texts = st.lists(st.sampled_from(PIECES), max_size=24).map("".join)
EOL = re.compile(r"\r\n|\r|\n")


def _units(s: str, encoding: str) -> list[int]:
    """Code units of `s`: UTF-16 units or UTF-8 bytes."""
    if encoding == "utf-8":
        return list(s.encode("utf-8"))
    data = s.encode("utf-16-le")
    return [int.from_bytes(data[i:i + 2], "little") for i in range(0, len(data), 2)]


def _valid(text: str, line: int, character: int, encoding: str) -> bool:
    lines = EOL.split(text)
    if not 0 <= line < len(lines) or character < 0:
        return False
    units = _units(lines[line], encoding)
    if character > len(units):
        return False
    if character == len(units):
        return True
    u = units[character]
    return not (0xDC00 <= u <= 0xDFFF if encoding == "utf-16" else 0x80 <= u <= 0xBF)


def _check_structure(s: RawServer, uri: str, text: str) -> None:
    """Every line's length and every position inside a character, as the server sees them,
    equal the reference text's."""
    enc = s.encoding  # type: ignore[attr-defined]
    lines = EOL.split(text)
    probes = [(len(lines), 0)]
    for i, ln in enumerate(lines):
        n = len(_units(ln, enc))
        probes += [(i, n), (i, n + 1)] + [(i, c) for c in range(n)
                                          if not _valid(text, i, c, enc)]
    ids = [(s.send_request("textDocument/inlineCompletion", {
        "textDocument": {"uri": uri}, "position": {"line": ln, "character": c},
        "context": {"triggerKind": 1}}), ln, c) for ln, c in probes]
    for msg_id, ln, c in ids:
        r = s.response(msg_id, 20)
        assert ("error" not in r) == _valid(text, ln, c, enc), (text, ln, c, r)


@FUZZ
@given(text=texts, positions=st.lists(st.tuples(
    st.integers(-2, 6) | st.sampled_from([2**31 - 1, 2**31, -2**31, 2**53]),
    st.integers(-2, 30) | st.sampled_from([2**31 - 1, 2**32, -2**31])), max_size=12))
def test_positions_negative_past_end_or_inside_a_character(probe_server, text, positions):
    s = probe_server
    enc = s.encoding  # type: ignore[attr-defined]
    s.open("file:///pos.py", text)
    ids = [(s.send_request("textDocument/inlineCompletion", {
        "textDocument": {"uri": "file:///pos.py"}, "position": {"line": ln, "character": c},
        "context": {"triggerKind": 1}}), ln, c) for ln, c in positions]
    for msg_id, ln, c in ids:
        r = s.response(msg_id, 20)
        if _valid(text, ln, c, enc):
            assert r.get("result", "missing") is None, r  # no model: null, not an error
        else:
            assert r["error"]["code"] == INVALID_PARAMS, (text, ln, c, r)


def _apply(text: str, change: dict[str, Any], encoding: str) -> str | None:
    """Reference edit on code units; None for an impossible range."""
    if "range" not in change:
        return change["text"]
    lines = EOL.split(text)
    breaks = EOL.findall(text) + [""]
    units = [u for ln, br in zip(lines, breaks, strict=True)
             for u in _units(ln, encoding) + _units(br, encoding)]
    starts, at = [], 0
    for ln, br in zip(lines, breaks, strict=True):
        starts.append(at)
        at += len(_units(ln, encoding)) + len(_units(br, encoding))
    pos = []
    for end in ("start", "end"):
        p = change["range"][end]
        if not _valid(text, p["line"], p["character"], encoding):
            return None
        pos.append(starts[p["line"]] + p["character"])
    if pos[0] > pos[1]:
        return None
    new = units[:pos[0]] + _units(change["text"], encoding) + units[pos[1]:]
    if encoding == "utf-8":
        return bytes(new).decode("utf-8")
    return b"".join(u.to_bytes(2, "little") for u in new).decode("utf-16-le")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_edits_keep_the_document_equal_to_a_reference_model(probe_server, data):
    s = probe_server
    enc = s.encoding  # type: ignore[attr-defined]
    uri = "file:///edit%20me.py"
    text = data.draw(texts)
    s.open(uri, text)
    for version in range(2, 2 + data.draw(st.integers(1, 5))):
        n_lines = len(EOL.split(text))

        def pos(n_lines: int = n_lines) -> dict[str, int]:
            return {"line": data.draw(st.integers(-1, n_lines)),
                    "character": data.draw(st.integers(-1, 12))}
        if data.draw(st.integers(0, 8)) == 0:
            change: dict[str, Any] = {"text": data.draw(texts)}
        else:
            change = {"range": {"start": pos(), "end": pos()}, "text": data.draw(texts)}
        target = uri if data.draw(st.integers(0, 5)) else "file:///never-opened.py"
        s.notify("textDocument/didChange", {"textDocument": {"uri": target,
                                                             "version": version},
                                            "contentChanges": [change]})
        if target == uri:
            after = _apply(text, change, enc)
            text = text if after is None else after
    _check_structure(s, uri, text)
    assert s.inline("file:///never-opened.py", 0, 0)["error"]["code"] == INVALID_PARAMS
    s.notify("textDocument/didClose", {"textDocument": {"uri": uri}})
