"""Generation requests, their parameters, results, and the caller's handle.

The engine thread pushes events into a handle; callers read them either blocking
(`for delta in handle`) or from an asyncio loop (`async for delta in handle.astream()`)
without ever blocking the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..constrain import TokenConstraint
from ..errors import ModelError, RequestError

_ids = itertools.count(1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # <= 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos ids
    ignore_eos: bool = False
    deadline_s: float | None = None  # wall-clock budget from submission
    skip_special_tokens: bool = True
    # Token healing: the generated text must begin with this (the caller removed it from
    # the end of the prompt so the model can choose the token that covers it).
    required_prefix: str = ""
    # Sample only ids in [start, end) (e.g. the image codes of a text-to-image model).
    token_range: tuple[int, int] | None = None
    # Classifier-free guidance: a second prompt (e.g. the empty prompt a text-to-image
    # model was also trained on) runs beside this one, and each step samples from
    # guide + scale * (logits - guide). None or scale 1: off.
    guidance_prompt: tuple[int, ...] | None = None
    guidance_scale: float = 1.0
    # Added to these ids' logits before sampling ((id, bias), ...), as OpenAI's
    # `logit_bias`: e.g. a vision answer nudged towards the words its OCR lines read.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Asked before each token which ids may come next (models/constrain.py), e.g. a
    # diagram's labels kept to the words its OCR read. None: any.
    constraint: TokenConstraint | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.token_range is not None and not 0 <= self.token_range[0] < self.token_range[1]:
            raise RequestError(f"token_range must be (start, end) with 0 <= start < end, "
                               f"got {self.token_range!r}")
        if self.guidance_prompt is not None:
            if not self.guidance_prompt or any(
                    not isinstance(t, int) or t < 0 for t in self.guidance_prompt):
                raise RequestError("guidance_prompt must be a non-empty sequence of token ids")
        if not (isinstance(self.guidance_scale, (int, float))
                and 0 < self.guidance_scale <= 100):
            raise RequestError(f"guidance_scale must be in (0, 100], got "
                               f"{self.guidance_scale!r}")
        for item in self.logit_bias:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int)
                    and item[0] >= 0 and isinstance(item[1], (int, float))
                    and -100 <= item[1] <= 100):
                raise RequestError(f"logit_bias holds (token id >= 0, bias in [-100, 100]) "
                                   f"pairs, got {item!r}")
        if self.constraint is not None and not callable(getattr(self.constraint, "allowed",
                                                                  None)):
            raise RequestError("constraint must have an allowed(generated) method")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise RequestError(f"deadline must be positive, got {self.deadline_s!r}")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled" | "deadline" | "error"
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache
    ttft_s: float | None  # submission -> first token sampled
    total_s: float
    error: ModelError | None = None

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


_DONE = object()


@dataclass
class Request:
    prompt_ids: list[int]  # an image's positions hold its (negative) content key
    params: SamplingParams
    images: dict[int, Any] = field(default_factory=dict)  # content key -> pixel values
    id: int = field(default_factory=lambda: next(_ids))
    submitted: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float | None:
        p = self.params.deadline_s
        return None if p is None else self.submitted + p


class RequestHandle:
    """What `Engine.submit` returns: a stream of text deltas, then a GenerationResult."""

    def __init__(self, request: Request, wake_engine: Callable[[], None]) -> None:
        self.request = request
        self._wake_engine = wake_engine
        self._events: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._waker: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self.tokens_generated = 0  # updated by the engine thread after each sampled token

    @property
    def id(self) -> int:
        return self.request.id

    def cancel(self) -> None:
        """Ask the engine to stop this request; it does so before its next decode step."""
        self.request.cancelled.set()
        self._wake_engine()

    # -- called by the engine thread --------------------------------------------------
    def _push(self, delta: str) -> None:
        self._events.put(delta)
        self._wake()

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        self._events.put(_DONE)
        self._done.set()
        self._wake()

    def _wake(self) -> None:
        with self._lock:
            waker = self._waker
        if waker is not None:
            try:
                waker()
            except RuntimeError:  # the consumer's loop has closed
                pass

    # -- called by consumers ----------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[str]:
        while True:
            if self._done.is_set() and self._events.empty():
                return  # another reader already took the end marker
            item = self._events.get()
            if item is _DONE:
                return
            assert isinstance(item, str)
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        assert self._result is not None
        return self._result

    async def astream(self) -> AsyncIterator[str]:
        """Deltas as they arrive, awaited on the running loop (never blocks it)."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def waker() -> None:
            loop.call_soon_threadsafe(ready.set)

        with self._lock:
            self._waker = waker
        try:
            while True:
                while True:
                    try:
                        item = self._events.get_nowait()
                    except queue.Empty:
                        if self._done.is_set():
                            return  # another reader already took the end marker
                        break
                    if item is _DONE:
                        return
                    assert isinstance(item, str)
                    yield item
                await ready.wait()
                ready.clear()
        finally:
            # A consumer that broke out of its loop is finalised later: it must not
            # unregister the waker of a newer consumer (e.g. aresult()).
            with self._lock:
                if self._waker is waker:
                    self._waker = None

    async def aresult(self) -> GenerationResult:
        """Wait for the result from asyncio (consumes any deltas not yet read)."""
        async for _ in self.astream():
            pass
        assert self._result is not None
        return self._result
