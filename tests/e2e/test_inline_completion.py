"""The real server over stdio: inline completions, streaming, cancellation, errors."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from conftest import (
    expected_completion,
    inline,
    open_doc,
    raw_request,
    record_partials,
    wait_ready,
)
from lsprotocol import types
from pygls.exceptions import JsonRpcException

CODE = "import os\n\n\ndef main(path):\n    data = open(path).read()\n    return "


async def test_result_equals_engine_greedy_completion(client, expected_engine):
    assert (await wait_ready(client))["state"] == "ready"
    open_doc(client, "file:///a.py", CODE)
    lines = CODE.split("\n")
    result = await inline(client, "file:///a.py", len(lines) - 1, len(lines[-1]))
    expected = expected_completion(expected_engine, CODE, len(CODE))
    texts = [item.insert_text for item in result.items]
    assert texts == ([expected] if expected else [])


async def test_streamed_partials_arrive_in_order_and_end_with_the_result(client):
    partials = record_partials(client)
    await wait_ready(client)
    text = "def f(x):\n"
    open_doc(client, "file:///s.py", text)
    token = str(uuid.uuid4())
    result = await inline(client, "file:///s.py", 1, 0, token=token)
    final = result.items[0].insert_text if result.items else None
    got = [v["items"][0]["insertText"] for v in partials.get(token, [])]
    assert all(v["isIncomplete"] is True for v in partials.get(token, []))
    if final:
        assert got and got[-1] == final
    # replace semantics: later partials extend or revise, never arrive out of order
    assert len(got) == len(set(got)) or got == sorted(got, key=len)


async def test_cancel_request_aborts_and_server_keeps_serving(client):
    partials = record_partials(client)
    await wait_ready(client)
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"codevista": {"maxTokens": 1024}}))
    open_doc(client, "file:///c.py", "x = 1\n\n")
    token, msg_id = str(uuid.uuid4()), str(uuid.uuid4())
    pending = asyncio.ensure_future(inline(client, "file:///c.py", 2, 0, token=token,
                                           msg_id=msg_id))
    for _ in range(500):
        if partials.get(token) or pending.done():
            break
        await asyncio.sleep(0.01)
    client.protocol.notify("$/cancelRequest", types.CancelParams(id=msg_id))
    with pytest.raises(JsonRpcException) as info:
        await asyncio.wait_for(pending, 10)
    assert info.value.code == -32800  # RequestCancelled
    open_doc(client, "file:///d.py", "y = 2\n")
    assert await inline(client, "file:///d.py", 0, 5) is not None


async def test_new_request_supersedes_the_one_in_flight(client):
    await wait_ready(client)
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"codevista": {"maxTokens": 1024}}))
    open_doc(client, "file:///e.py", "z = 3\n\n")
    first = asyncio.ensure_future(inline(client, "file:///e.py", 2, 0))
    await asyncio.sleep(0.05)
    second = await asyncio.wait_for(inline(client, "file:///e.py", 2, 0), 30)
    assert second is not None
    assert first.done()  # the superseded request was answered first, not left running
    stats = await client.workspace_execute_command_async(types.ExecuteCommandParams(
        command="codevista.stats"))
    assert stats["requests"] >= 2


@pytest.mark.parametrize("where", ["past_last_line", "past_line_end", "inside_char",
                                   "negative"])
async def test_bad_positions_get_errors_and_server_keeps_serving(client, where):
    await wait_ready(client)
    text = "ok = 1\nx = '日本🎉'\n"
    utf8 = client.position_encoding == types.PositionEncodingKind.Utf8
    # inside the emoji: UTF-16 units 7-8 (a surrogate pair), UTF-8 bytes 11-14
    line, character = {"past_last_line": (5, 0), "past_line_end": (0, 99),
                       "inside_char": (1, 12 if utf8 else 8), "negative": (-1, 0)}[where]
    open_doc(client, "file:///p.py", text)
    with pytest.raises(JsonRpcException) as info:
        await inline(client, "file:///p.py", line, character)
    assert info.value.code == -32602  # InvalidParams
    assert await inline(client, "file:///p.py", 0, 6) is not None


async def test_utf16_positions_with_cjk_and_emoji(client, expected_engine):
    await wait_ready(client)
    text = "s = '日本語🎉' + name\nt = "
    open_doc(client, "file:///u.py", text)
    offset = text.index("🎉") + 1  # just after the emoji
    before = text[:offset]
    utf8 = client.position_encoding == types.PositionEncodingKind.Utf8
    character = len(before.encode("utf-8" if utf8 else "utf-16-le")) // (1 if utf8 else 2)
    assert character == (18 if utf8 else 10)
    result = await inline(client, "file:///u.py", 0, character)
    expected = expected_completion(expected_engine, text, offset)
    assert [i.insert_text for i in result.items] == ([expected] if expected else [])


async def test_two_documents_at_once(client, expected_engine):
    """Both answered, each with the other open document as context."""
    await wait_ready(client)
    docs = {"file:///one.py": "def one():\n    return ", "file:///two.py": "class Two:\n    "}
    for uri, text in docs.items():
        open_doc(client, uri, text)
    results = await asyncio.gather(*(
        inline(client, uri, 1, len(text.split("\n")[1])) for uri, text in docs.items()))
    for (uri, text), result in zip(docs.items(), results, strict=True):
        others = [(u, t) for u, t in docs.items() if u != uri]
        expected = expected_completion(expected_engine, text, len(text), uri=uri,
                                       others=others)
        assert [i.insert_text for i in result.items] == ([expected] if expected else [])


async def test_settings_change_and_bad_settings(client):
    await wait_ready(client)
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"codevista": {"maxTokens": "lots", "languages": {"python": False}}}))
    await asyncio.sleep(0.2)
    assert any("maxTokens" in m.message for m in client.messages)
    open_doc(client, "file:///off.py", "x = ")
    assert await inline(client, "file:///off.py", 0, 4) is None  # python switched off


async def test_invalid_param_types_get_an_error_not_silence(client):
    await wait_ready(client)
    with pytest.raises(JsonRpcException) as info:
        await asyncio.wait_for(raw_request(
            client, "textDocument/inlineCompletion",
            {"textDocument": {"uri": 5}, "position": "here", "context": {}}), 10)
    assert info.value.code == -32602
