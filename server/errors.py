"""Errors of the language-server layer, and their one conversion to JSON-RPC errors."""

from __future__ import annotations

from codevista.models.errors import ModelError, RequestError
from pygls.exceptions import JsonRpcException, JsonRpcInternalError, JsonRpcInvalidParams

from .documents import PositionError


class DocumentNotOpenError(ValueError):
    """A request for a document the client never opened."""


def to_jsonrpc(error: Exception) -> JsonRpcException:
    if isinstance(error, JsonRpcException):
        return error
    if isinstance(error, PositionError | DocumentNotOpenError | RequestError):
        return JsonRpcInvalidParams(str(error))
    if isinstance(error, ModelError):
        return JsonRpcInternalError(str(error))
    return JsonRpcInternalError(f"{type(error).__name__}: {error}")
