"""`codevista.translate` over LSP, on the real server with the embedded default model."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import pytest_lsp
from conftest import (
    SERVER,
    capabilities,
    open_doc,
    raw_request,
    record_partials,
    track_status,
    wait_ready,
)
from lsprotocol import types
from pygls.exceptions import JsonRpcException
from pytest_lsp import ClientServerConfig, LanguageClient

JAVA = """import java.util.*;

public class Stack {
    private List<Integer> items = new ArrayList<>();

    public void push(int x) {
        items.add(x);
    }

    public int pop() {
        return items.remove(items.size() - 1);
    }
}
"""


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient):
    track_status(lsp_client)
    await lsp_client.initialize_session(types.InitializeParams(
        capabilities=capabilities("vscode"), initialization_options={}))
    assert (await wait_ready(lsp_client))["state"] == "ready"
    yield
    await lsp_client.shutdown_session()


async def translate(client: LanguageClient, args: dict, msg_id: str | None = None):
    return await raw_request(client, "workspace/executeCommand",
                             {"command": "codevista.translate", "arguments": [args]}, msg_id)


def expected(code: str, source: str, target: str) -> str:
    """The in-process translation of the same text: what the server must send."""
    from codevista.server.backend import LocalBackend
    from codevista.server.features.translate import TranslationService
    from codevista.server.translation import resolve_language

    async def run() -> str:
        backend = LocalBackend()
        await backend.load(None, "float32", lambda m: None)
        try:
            result = await TranslationService(backend).translate(
                code, resolve_language(source), resolve_language(target))
            return result.text
        finally:
            backend.close()

    return asyncio.run(run())


async def test_selection_streams_and_ends_in_the_final_text(client):
    partials = record_partials(client)
    open_doc(client, "file:///w/Stack.java", JAVA, "java")
    token = str(uuid.uuid4())
    # the push method: lines 5-7
    args = {"uri": "file:///w/Stack.java", "targetLanguage": "C#", "partialResultToken": token,
            "range": {"start": {"line": 5, "character": 0}, "end": {"line": 8, "character": 0}}}
    result = await translate(client, args)
    selection = "".join(JAVA.splitlines(keepends=True)[5:8])
    want = await asyncio.to_thread(expected, selection, "java", "csharp")
    assert result["text"] == want and want.strip()
    assert result["targetLanguage"] == "csharp" and result["sourceLanguage"] == "java"
    assert result["suggestedFileName"] == "Stack.cs"
    values = partials.get(token, [])
    assert values and all(v["isIncomplete"] is True for v in values)
    assert values[-1]["text"].rstrip("\n") == result["text"].rstrip("\n")


async def test_whole_document_and_empty_selection_are_the_same(client):
    open_doc(client, "file:///w/Stack.java", JAVA, "java")
    whole = await translate(client, {"uri": "file:///w/Stack.java", "targetLanguage": "cs"})
    empty = await translate(client, {
        "uri": "file:///w/Stack.java", "targetLanguage": "csharp",
        "range": {"start": {"line": 3, "character": 4}, "end": {"line": 3, "character": 4}}})
    assert whole["text"] == empty["text"]
    assert whole["pieces"] == 4  # header, two methods, the class's closing brace
    assert whole["text"] == await asyncio.to_thread(expected, JAVA, "java", "csharp")
    assert whole["text"].rstrip().endswith("}")


async def test_cancel_mid_stream_then_the_next_request_works(client):
    partials = record_partials(client)
    many = "".join(f"def f{i}(x):\n    return x * {i} + {i}\n\n\n" for i in range(40))
    open_doc(client, "file:///w/many.py", many, "python")
    token, msg_id = str(uuid.uuid4()), str(uuid.uuid4())
    pending = asyncio.ensure_future(translate(client, {
        "uri": "file:///w/many.py", "targetLanguage": "java", "partialResultToken": token},
        msg_id))
    for _ in range(1000):
        if partials.get(token) or pending.done():
            break
        await asyncio.sleep(0.01)
    assert partials.get(token), "no partial result before the cancellation"
    client.protocol.notify("$/cancelRequest", types.CancelParams(id=msg_id))
    with pytest.raises(JsonRpcException) as info:
        await asyncio.wait_for(pending, 20)
    assert info.value.code == -32800  # RequestCancelled
    n = len(partials[token])
    await asyncio.sleep(0.5)
    assert len(partials[token]) == n  # nothing streamed after the cancellation
    small = await translate(client, {"uri": "file:///w/many.py", "targetLanguage": "java",
                                     "range": {"start": {"line": 0, "character": 0},
                                               "end": {"line": 2, "character": 0}}})
    assert small["text"].strip()


async def test_unsupported_target_names_the_supported_languages(client):
    open_doc(client, "file:///w/a.py", "x = 1\n", "python")
    with pytest.raises(JsonRpcException) as info:
        await translate(client, {"uri": "file:///w/a.py", "targetLanguage": "cobol"})
    assert info.value.code == -32602
    for name in ("Python", "Java", "C#", "C", "C++", "JavaScript", "TypeScript", "Go", "Rust"):
        assert name in str(info.value)


async def test_source_language_the_model_does_not_know(client):
    kotlin = "fun add(a: Int, b: Int): Int {\n    return a + b\n}\n"
    open_doc(client, "file:///w/a.kt", kotlin, "kotlin")
    with pytest.raises(JsonRpcException) as info:
        await translate(client, {"uri": "file:///w/a.kt", "targetLanguage": "java"})
    assert info.value.code == -32602 and "kotlin" in str(info.value).lower()
    # the user says what it is closest to: then it translates
    ok = await translate(client, {"uri": "file:///w/a.kt", "targetLanguage": "java",
                                  "sourceLanguage": "java"})
    assert ok["suggestedFileName"] == "a.java"


async def test_bad_arguments_get_errors_and_the_server_keeps_serving(client):
    open_doc(client, "file:///w/b.py", "x = 1\n", "python")
    bad = [
        {"targetLanguage": "java"},  # no uri
        {"uri": "file:///w/never-opened.py", "targetLanguage": "java"},
        {"uri": "file:///w/b.py", "targetLanguage": "java", "range": {"start": 3}},
        {"uri": "file:///w/b.py", "targetLanguage": "java",
         "range": {"start": {"line": 9, "character": 0}, "end": {"line": 9, "character": 1}}},
    ]
    for args in bad:
        with pytest.raises(JsonRpcException) as info:
            await translate(client, args)
        assert info.value.code == -32602, args
    with pytest.raises(JsonRpcException):
        await raw_request(client, "workspace/executeCommand",
                          {"command": "codevista.translate", "arguments": ["file:///w/b.py"]})
    blank = await translate(client, {"uri": "file:///w/b.py", "targetLanguage": "go",
                                     "range": {"start": {"line": 1, "character": 0},
                                               "end": {"line": 1, "character": 0}}})
    assert blank["suggestedFileName"] == "b.go"
    whitespace = "\n\n   \n"
    open_doc(client, "file:///w/blank.py", whitespace, "python")
    assert (await translate(client, {"uri": "file:///w/blank.py",
                                     "targetLanguage": "go"}))["text"] == ""
