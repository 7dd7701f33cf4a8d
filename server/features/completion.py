"""Inline completions (ghost text), streamed, with prefix reuse, superseding and type-through.

One `CompletionService` per server. A request for a document supersedes the one in
flight for it; `$/cancelRequest` (the handler task is cancelled) aborts the engine
request before its next decode step. When the user types exactly the start of the
current suggestion, the rest is answered at once without the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from codevista.models.engine import SamplingParams

from ..backend import Generation, LocalBackend
from ..documents import Snapshot
from ..postprocess import Policy, finish
from ..prompts import build_prompt, prompt_budget
from ..settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Shown:
    """The last suggestion shown for a document, for type-through."""

    prefix: str
    suffix: str
    text: str


@dataclass
class CompletionStats:
    requests: int = 0
    answered_without_model: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    cancelled: int = 0

    def as_dict(self) -> dict[str, float | int]:
        share = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return {"requests": self.requests, "answeredWithoutModel": self.answered_without_model,
                "promptTokens": self.prompt_tokens, "cachedTokens": self.cached_tokens,
                "cacheShare": round(share, 4), "cancelled": self.cancelled}


class CompletionService:
    def __init__(self, backend: LocalBackend, settings: Callable[[], Settings]) -> None:
        self.backend = backend
        self.settings = settings
        self.inflight: dict[str, Generation] = {}
        self.shown: dict[str, _Shown] = {}
        self.stats = CompletionStats()

    def _type_through(self, snap: Snapshot) -> str | None:
        last = self.shown.get(snap.uri)
        if last is None or snap.suffix != last.suffix or not snap.prefix.startswith(last.prefix):
            return None
        typed = snap.prefix[len(last.prefix):]
        if typed and last.text.startswith(typed) and len(typed) < len(last.text):
            return last.text[len(typed):]
        return None

    async def complete(self, snap: Snapshot,
                       on_partial: Callable[[str], None] | None = None,
                       others: list[tuple[str, str]] | None = None) -> str | None:
        """The suggestion for `snap` ("" for nothing worth showing), or None if no model."""
        self.stats.requests += 1
        rest = self._type_through(snap)
        if rest is not None:
            self.stats.answered_without_model += 1
            self.shown[snap.uri] = _Shown(snap.prefix, snap.suffix, rest)
            if on_partial is not None:
                on_partial(rest)
            return rest
        backend = self.backend
        if backend.state != "ready" or backend.tokenizer is None or backend.family is None:
            return None
        previous = self.inflight.pop(snap.uri, None)
        if previous is not None:
            previous.cancel()  # superseded by this newer request
        settings = self.settings()
        family = backend.family
        policy = Policy.for_snapshot(snap)
        max_new = min(settings.max_tokens, 48) if policy.single_line else settings.max_tokens
        max_new = min(max_new, backend.max_positions // 2)
        # The prompt budget never exceeds what the model was built for.
        budget = prompt_budget(settings.context_tokens, backend.max_positions, max_new,
                               getattr(backend, "prompt_tokens", None))
        prompt = build_prompt(family, backend.tokenizer, snap, budget, path=snap.uri,
                              heal_tokens=getattr(backend, "supports_healing", True),
                              others=others)
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=settings.temperature,
            stop_token_ids=backend.stop_ids(family.stop_tokens),
            deadline_s=30.0, required_prefix=prompt.heal)
        if getattr(backend, "infill", False):  # llama-server adds its own FIM tokens
            gen = backend.submit_infill(prompt.fim_prefix, prompt.fim_suffix, params,
                                        len(prompt.ids))
        else:
            gen = backend.submit(prompt.ids, params)
        self.inflight[snap.uri] = gen
        heal = prompt.heal
        generated, raw, sent = "", "", None
        try:
            async for delta in gen.astream():
                generated += delta
                if len(generated) < len(heal):
                    continue  # still re-generating the healed text
                raw = generated[len(heal):] if generated.startswith(heal) else ""
                kept, done = policy.cut(raw)
                if on_partial is not None:
                    partial = kept.rstrip(" \t")
                    if partial and partial != sent:
                        on_partial(partial)
                        sent = partial
                if done:
                    gen.cancel()  # the suggestion is complete: stop spending compute
                    break
            result = await gen.aresult()
        except asyncio.CancelledError:
            gen.cancel()
            self.stats.cancelled += 1
            raise
        finally:
            if self.inflight.get(snap.uri) is gen:
                del self.inflight[snap.uri]
        self.stats.prompt_tokens += result.prompt_tokens
        self.stats.cached_tokens += result.cached_tokens
        if result.error is not None:
            raise result.error
        text = finish(policy.cut(raw)[0], snap)
        if on_partial is not None and text and text != sent:
            on_partial(text)
        self.shown[snap.uri] = _Shown(snap.prefix, snap.suffix, text)
        log.debug("completion %s: %d prompt tokens (%d cached), %r", snap.uri,
                  result.prompt_tokens, result.cached_tokens, text[:60])
        return text
