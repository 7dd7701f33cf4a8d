"""Errors of the language-server layer, and their one conversion to JSON-RPC errors."""

from __future__ import annotations

from codevista.models.errors import ModelError, RequestError
from pygls.exceptions import JsonRpcException, JsonRpcInternalError, JsonRpcInvalidParams

from .documents import PositionError
from .translation import UnsupportedLanguageError
from .vision import ImageRequestError


class DocumentNotOpenError(ValueError):
    """A request for a document the client never opened."""


class ArgumentError(ValueError):
    """A command's arguments are missing or of the wrong shape."""


class NotReadyError(RuntimeError):
    """No model is loaded (still loading, or the load failed)."""


MAX_MESSAGE = 1000


def _short(text: str) -> str:
    """A message that echoes a huge argument (an 8 MB "uri") is cut, not sent back whole."""
    if len(text) <= MAX_MESSAGE:
        return text
    return f"{text[:MAX_MESSAGE - 40]}… ({len(text)} characters)"


def to_jsonrpc(error: Exception) -> JsonRpcException:
    if isinstance(error, JsonRpcException):
        return error
    if isinstance(error, PositionError | DocumentNotOpenError | RequestError | ArgumentError
                  | UnsupportedLanguageError | ImageRequestError):
        return JsonRpcInvalidParams(_short(str(error)))
    if isinstance(error, ModelError | NotReadyError):
        return JsonRpcInternalError(_short(str(error)))
    return JsonRpcInternalError(_short(f"{type(error).__name__}: {error}"))
