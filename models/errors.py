"""Typed errors of the inference engine.

Every failure the engine can explain has its own class, so callers (the CLI, the
language server) can turn it into a clear message without parsing strings.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error raised by codevista.models."""


class CheckpointError(ModelError):
    """A checkpoint directory cannot be loaded."""


class CheckpointNotFoundError(CheckpointError):
    """The directory, or a file the checkpoint needs, does not exist."""


class MissingTokenizerError(CheckpointNotFoundError):
    """The checkpoint has no tokenizer.json."""


class UnsafeCheckpointError(CheckpointError):
    """The weights exist only in a pickle-based format, which is never loaded."""


class CorruptCheckpointError(CheckpointError):
    """A weights file is truncated or not a valid safetensors file."""


class UnsupportedArchitectureError(CheckpointError):
    """config.json names an architecture, or a feature of one, that the engine lacks."""


class ConfigError(CheckpointError):
    """config.json is unreadable or holds values that cannot describe a model."""


class ShapeMismatchError(CheckpointError):
    """A tensor in the weights does not have the shape config.json implies."""


class MissingWeightError(CheckpointError):
    """A tensor the model needs is absent from the weights."""


class TokenizerMismatchError(CheckpointError):
    """tokenizer.json and config.json disagree (vocabulary size, special token ids)."""


class RequestError(ModelError):
    """A generation request is invalid (bad sampling values, empty prompt...)."""


class ContextLengthError(RequestError):
    """The prompt plus the tokens to generate do not fit the model or the cache."""


class EngineStoppedError(ModelError):
    """The engine thread is not running."""
