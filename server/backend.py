"""The engine behind the server: one interface, whatever runs the model.

`LocalBackend` loads a checkpoint into the in-process engine on a worker thread, so the
event loop keeps answering while a model loads; its state is "loading", "ready" or
"error" (with the reason). Remote backends implement the same protocol.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

from codevista.models.chat import ChatTemplate
from codevista.models.engine import Engine, GenerationResult, SamplingParams
from codevista.models.errors import ModelError
from codevista.models.loader import DEFAULT_MODEL_DIR, LoadedModel, load_model
from codevista.models.tokenizer import Tokenizer

from .prompts import Family, detect_family, model_prompt_tokens

log = logging.getLogger(__name__)


class Generation(Protocol):
    def astream(self) -> AsyncIterator[str]: ...
    async def aresult(self) -> GenerationResult: ...
    def cancel(self) -> None: ...


class Backend(Protocol):
    state: str  # "idle" | "loading" | "ready" | "error"
    error: str | None
    model_name: str
    tokenizer: Tokenizer | None
    family: Family | None
    max_positions: int

    async def load(self, model_path: str | None, dtype: str,
                   report: Callable[[str], None]) -> None: ...
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Generation: ...
    def close(self) -> None: ...


class LocalBackend:
    """The in-process engine (one engine thread per loaded model)."""

    def __init__(self, cache_bytes: int = 512 << 20) -> None:
        self.state = "idle"
        self.error: str | None = None
        self.model_name = ""
        self.tokenizer: Tokenizer | None = None
        self.family: Family | None = None
        self.chat_template: ChatTemplate | None = None
        self.engine: Engine | None = None
        self.loaded: LoadedModel | None = None
        self.cache_bytes = cache_bytes
        self.prompt_tokens: int | None = None  # the model's own prompt limit, if it sets one
        self._lock = asyncio.Lock()

    async def load(self, model_path: str | None, dtype: str,
                   report: Callable[[str], None]) -> None:
        async with self._lock:
            path = Path(model_path).expanduser() if model_path else DEFAULT_MODEL_DIR
            self.close()
            self.state, self.error = "loading", None
            self.model_name = path.name if model_path else "codevista-default"
            report(f"loading {self.model_name}")
            try:
                loaded = await asyncio.to_thread(load_model, path, dtype)
            except ModelError as e:
                self.state, self.error = "error", str(e)
                log.error("model load failed: %s", e)
                return
            except Exception as e:  # an unexpected failure must not take the server down
                self.state, self.error = "error", f"model load failed: {e}"
                log.exception("model load failed")
                return
            try:
                template = ChatTemplate.from_dir(path)
            except ModelError as e:  # completions still work; chat prompting does not
                log.warning("chat template ignored: %s", e)
                template = None
            report(f"warming up {self.model_name}")
            engine = Engine(loaded, cache_bytes=self.cache_bytes, warmup=True).start()
            self.loaded, self.engine = loaded, engine
            self.tokenizer = loaded.tokenizer
            self.chat_template = template
            self.family = detect_family(loaded.tokenizer)
            self.prompt_tokens = model_prompt_tokens(path)
            self.state = "ready"
            log.info("model %s ready (family %s)", self.model_name, self.family.name)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Generation:
        if self.engine is None:
            raise ModelError("no model is loaded")
        return self.engine.submit(prompt_ids, params)

    @property
    def max_positions(self) -> int:
        return self.loaded.model.max_positions if self.loaded is not None else 0

    def stop_ids(self, stop_tokens: tuple[str, ...]) -> tuple[int, ...]:
        assert self.loaded is not None and self.tokenizer is not None
        ids = set(self.loaded.stop_token_ids)
        ids.update(i for t in stop_tokens if (i := self.tokenizer.token_to_id(t)) is not None)
        return tuple(sorted(ids))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
        self.engine = None
        self.loaded = None
        self.tokenizer = None
        self.family = None
        self.chat_template = None
        self.state = "idle"
