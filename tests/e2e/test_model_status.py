"""A missing or broken model is reported to the user; the server stays up."""

from __future__ import annotations

import sys

import pytest_lsp
from conftest import SERVER, capabilities, inline, open_doc, track_status, wait_ready
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def missing(lsp_client: LanguageClient, tmp_path_factory):
    track_status(lsp_client)
    await lsp_client.initialize_session(types.InitializeParams(
        capabilities=capabilities("neovim"),
        initialization_options={"modelPath": "/nonexistent/model"}))
    yield
    await lsp_client.shutdown_session()


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def corrupt(lsp_client: LanguageClient, tmp_path_factory, qwen_dir):
    import shutil

    bad = tmp_path_factory.mktemp("corrupt") / "model"
    shutil.copytree(qwen_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 3])
    track_status(lsp_client)
    await lsp_client.initialize_session(types.InitializeParams(
        capabilities=capabilities("vscode"), initialization_options={"modelPath": str(bad)}))
    yield
    await lsp_client.shutdown_session()


async def test_missing_model_is_reported_and_requests_get_null(missing):
    status = await wait_ready(missing)
    assert status["state"] == "error" and "does not exist" in status["message"]
    assert any(m.type == types.MessageType.Error and "does not exist" in m.message
               for m in missing.messages)
    open_doc(missing, "file:///a.py", "x = ")
    assert await inline(missing, "file:///a.py", 0, 4) is None


async def test_corrupt_model_is_reported(corrupt):
    status = await wait_ready(corrupt)
    assert status["state"] == "error"
    assert any("safetensors" in m.message for m in corrupt.messages)
    assert sys.executable  # the server process is alive: it answers the next request
    open_doc(corrupt, "file:///a.py", "x = ")
    assert await inline(corrupt, "file:///a.py", 0, 4) is None
