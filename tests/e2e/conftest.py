"""End-to-end fixtures: the real `codevista serve` process over stdio, driven by pytest-lsp
with real Neovim and VS Code client capabilities, on a tiny seeded checkpoint."""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

SERVER = [sys.executable, "-m", "codevista.server.cli", "serve"]
CLIENTS = {"neovim": "neovim", "vscode": "visual_studio_code"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def capabilities(name: str, streaming: bool = True) -> types.ClientCapabilities:
    caps = client_capabilities(CLIENTS[name])
    if streaming:
        caps.experimental = {"codevista": {"streaming": True}}
    return caps


def record_partials(client: LanguageClient) -> dict[Any, list[Any]]:
    """Replace the client's $/progress handler: keep partial results by token."""
    partials: dict[Any, list[Any]] = {}
    work: dict[Any, list[Any]] = client.progress_reports

    def on_progress(params: Any) -> None:
        value = params.value
        if isinstance(value, dict) and "kind" in value:
            work.setdefault(params.token, []).append(value)
        else:
            partials.setdefault(params.token, []).append(value)

    client.protocol.fm.features[types.PROGRESS] = on_progress
    return partials


def track_status(client: LanguageClient) -> None:
    """Keep every codevista/status notification (register before initializing)."""
    seen: list[dict[str, Any]] = []

    def on_status(params: Any) -> None:
        seen.append({k: params[k] if isinstance(params, dict) else getattr(params, k)
                     for k in ("state", "model", "message")})

    client.protocol.fm.features["codevista/status"] = on_status
    client.codevista_status = seen  # type: ignore[attr-defined]


async def wait_ready(client: LanguageClient, timeout: float = 60) -> dict[str, Any]:
    """The first final status (ready or error) the server sent."""
    seen: list[dict[str, Any]] = client.codevista_status  # type: ignore[attr-defined]
    for _ in range(int(timeout / 0.02)):
        done = [s for s in seen if s["state"] in ("ready", "error")]
        if done:
            return done[0]
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no ready/error status within {timeout} s: {seen}")


def open_doc(client: LanguageClient, uri: str, text: str, language: str = "python") -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        text_document=types.TextDocumentItem(uri=uri, language_id=language, version=1,
                                             text=text)))


async def inline(client: LanguageClient, uri: str, line: int, character: int,
                 token: str | None = None, msg_id: str | None = None) -> Any:
    params: dict[str, Any] = {"textDocument": {"uri": uri},
                              "position": {"line": line, "character": character},
                              "context": {"triggerKind": 1}}
    if token is not None:
        params["partialResultToken"] = token
    return await raw_request(client, "textDocument/inlineCompletion", params, msg_id)


async def raw_request(client: LanguageClient, method: str, params: Any,
                      msg_id: str | None = None) -> Any:
    """Send params as plain JSON (lsprotocol's types have no partialResultToken here)."""
    from concurrent.futures import Future

    from pygls.protocol.json_rpc import JsonRPCRequestMessage

    proto = client.protocol
    msg_id = msg_id or str(uuid.uuid4())
    future: Future[Any] = Future()
    proto._request_futures[msg_id] = future
    proto._result_types[msg_id] = proto.get_result_type(method)
    proto._send_data(JsonRPCRequestMessage(id=msg_id, method=method, params=params,
                                           jsonrpc="2.0"))
    return await asyncio.wrap_future(future)


@pytest.fixture(scope="session")
def e2e_model(qwen_dir: Path) -> Path:
    return qwen_dir


@pytest.fixture(scope="session")
def expected_engine(e2e_model: Path):
    """The in-process engine on the same checkpoint: what the server must reproduce."""
    from codevista.models.engine import Engine
    from codevista.models.loader import load_model

    with Engine(load_model(e2e_model)) as engine:
        yield engine


def expected_completion(engine, text: str, offset: int, language: str = "python",
                        max_tokens: int = 24, uri: str = "file:///x.py",
                        others: list[tuple[str, str]] | None = None) -> str:
    """The engine's own greedy completion for the prompt the server builds, post-processed."""
    from codevista.models.engine import SamplingParams
    from codevista.server.documents import Snapshot
    from codevista.server.postprocess import Policy, finish
    from codevista.server.prompts import (
        build_prompt,
        detect_family,
        model_prompt_tokens,
        prompt_budget,
    )

    tok = engine.tokenizer
    family = detect_family(tok)
    snap = Snapshot(uri=uri, version=1, text=text, language_id=language, offset=offset)
    policy = Policy.for_snapshot(snap)
    max_new = min(max_tokens, 48) if policy.single_line else max_tokens
    budget = prompt_budget(1024, engine.model.max_positions, max_new,
                           model_prompt_tokens(engine.loaded.path))
    prompt = build_prompt(family, tok, snap, budget, path=uri, others=others)
    stops = set(engine.loaded.stop_token_ids)
    stops.update(i for t in family.stop_tokens if (i := tok.token_to_id(t)) is not None)
    out = engine.generate(prompt.ids, SamplingParams(
        max_new_tokens=min(max_tokens, 48) if policy.single_line else max_tokens,
        stop_token_ids=tuple(sorted(stops)), required_prefix=prompt.heal)).text
    raw = out[len(prompt.heal):] if out.startswith(prompt.heal) else ""
    return finish(policy.cut(raw)[0], snap)


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER), params=list(CLIENTS))
async def client(lsp_client: LanguageClient, request):
    model: Path = request.getfixturevalue("e2e_model")
    track_status(lsp_client)
    result = await lsp_client.initialize_session(types.InitializeParams(
        capabilities=capabilities(request.param),
        initialization_options={"modelPath": str(model), "maxTokens": 24}))
    lsp_client.position_encoding = result.capabilities.position_encoding  # type: ignore
    yield
    await lsp_client.shutdown_session()
