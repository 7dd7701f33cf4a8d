"""The inference engine: an engine thread, a prefix cache, streamed generation."""

from .engine import Engine, EngineStats
from .request import GenerationResult, RequestHandle, SamplingParams

__all__ = ["Engine", "EngineStats", "GenerationResult", "RequestHandle", "SamplingParams"]
