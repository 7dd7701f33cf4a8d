"""Translation of a selection or a whole file into another language, streamed.

The source is cut into pieces that fit the model's context (server/translation.py), each
piece is translated with the prompt style of the loaded model, and the text so far
(finished pieces plus the current one) is reported after every token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from codevista.models import formats
from codevista.models.engine import SamplingParams

from ..errors import ArgumentError, NotReadyError
from ..translation import (
    Language,
    OutputCutter,
    UnsupportedLanguageError,
    chat_answer_start,
    chat_messages,
    clean_output,
    count_blocks,
    is_closing,
    plan_pieces,
    supported_names,
    tagged_prompt,
    tagged_stops,
)

log = logging.getLogger(__name__)

MAX_SOURCE_CHARS = 1 << 20  # one MiB of source is beyond any editor selection worth it


@dataclass
class TranslationResult:
    text: str
    target: Language
    pieces: int
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    finish_reasons: list[str] = field(default_factory=list)


class Translator:
    """Builds prompts for one loaded model: its family decides the style."""

    def __init__(self, backend) -> None:
        self.backend = backend
        tok = backend.tokenizer
        if getattr(getattr(backend, "cfg", None), "chat", False):
            self.style = "remote-chat"  # messages to /v1/chat/completions
        elif backend.family is not None and backend.family.name == "codevista":
            self.style = "embedded"
        elif getattr(backend, "chat_template", None) is not None:
            self.style = "chat"
        else:
            self.style = "tagged"
        self.tokenizer = tok

    def check_source(self, source: Language) -> None:
        if self.style == "embedded" and source.id not in formats.LANGUAGES:
            raise UnsupportedLanguageError(
                f"the embedded model cannot translate from {source.name!r}; it knows "
                f"{supported_names()} (pass sourceLanguage if the document's language id "
                "is wrong)")

    def prompt(self, code: str, source: Language, target: Language) -> str:
        if self.style == "embedded":
            return formats.translation(source.id, code, target.id)
        if self.style == "chat":
            text = self.backend.chat_template.render(chat_messages(code, source, target))
            return text + chat_answer_start(target)
        return tagged_prompt(code, source, target)

    def messages(self, code: str, source: Language, target: Language) -> list[dict]:
        return chat_messages(code, source, target)

    def stops(self, source: Language, target: Language) -> tuple[str, ...]:
        if self.style == "chat":
            return ("```",)
        if self.style == "tagged":
            return tagged_stops(source, target)
        return ()

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def overhead(self, source: Language, target: Language) -> int:
        if self.style == "remote-chat":  # the server's template adds a few tokens per turn
            return sum(self.count(m["content"]) + 8 for m in self.messages("", source, target))
        return self.count(self.prompt("", source, target))


class TranslationService:
    def __init__(self, backend, max_positions_cap: int | None = None) -> None:
        self.backend = backend
        self.cap = max_positions_cap

    async def translate(self, code: str, source: Language, target: Language,
                        on_partial: Callable[[str], None] | None = None,
                        temperature: float = 0.0) -> TranslationResult:
        backend = self.backend
        if backend.state != "ready" or backend.tokenizer is None:
            raise NotReadyError(f"the model is not ready ({backend.state}"
                               f"{': ' + backend.error if backend.error else ''})")
        if len(code) > MAX_SOURCE_CHARS:
            raise ArgumentError(f"the source is {len(code)} characters; translation takes at "
                             f"most {MAX_SOURCE_CHARS}")
        t0 = time.monotonic()
        tr = Translator(backend)
        tr.check_source(source)
        result = TranslationResult("", target, 0)
        if not code.strip():
            return result
        window = backend.max_positions if self.cap is None else min(self.cap,
                                                                   backend.max_positions)
        overhead = tr.overhead(source, target) + 8
        # A piece's prompt plus its translation (about as long, a little more) must fit.
        room = max(16, int((window - overhead) / 2.3))
        pieces = plan_pieces(code, source, lambda piece: tr.count(piece) <= room,
                             leaf=tr.style == "embedded")
        result.pieces = len(pieces)
        done = ""
        stop_ids = backend.stop_ids(backend.family.stop_tokens if backend.family else ())
        for piece in pieces:
            lead, body, trail = _split_space(piece)
            if not body:
                done += piece
                continue
            if tr.style == "remote-chat":
                prompt_ids = []
                prompt_len = tr.count(body) + overhead
            else:
                prompt_ids = tr.tokenizer.encode(tr.prompt(body, source, target),
                                                 add_special_tokens=False)
                prompt_len = len(prompt_ids)
            budget = window - prompt_len
            if budget < 8:
                raise ArgumentError("a piece of the source does not fit the model's context")
            if is_closing(body):  # a class's closing brace, its members translated apart
                done += piece if target.braces else ""
                if on_partial is not None and target.braces:
                    on_partial(done)
                continue
            cutter = OutputCutter(target, count_blocks(body, source))
            params = SamplingParams(
                max_new_tokens=max(8, min(budget, int(tr.count(body) * 2.5) + 48)),
                temperature=temperature, stop=tr.stops(source, target),
                stop_token_ids=stop_ids, deadline_s=300.0)
            if tr.style == "remote-chat":
                gen = backend.submit_chat(tr.messages(body, source, target), params,
                                          prompt_len)
            else:
                gen = backend.submit(prompt_ids, params)
            raw, shown = "", None
            # a chat answer may open with a sentence and a fence: cut the code inside it
            code_of = ((lambda t: clean_output(t, final=False)) if tr.style == "remote-chat"
                       else (lambda t: t))
            try:
                async for delta in gen.astream():
                    raw += delta
                    kept, complete = cutter.cut(code_of(raw))
                    partial = clean_output(kept, final=False)
                    if on_partial is not None and partial and partial != shown:
                        shown = partial
                        on_partial(done + lead + partial)
                    if complete:
                        gen.cancel()  # the piece is whole: stop spending compute
                        break
                out = await gen.aresult()
            except asyncio.CancelledError:
                gen.cancel()
                raise
            if out.error is not None:
                raise out.error
            result.prompt_tokens += out.prompt_tokens
            result.generated_tokens += out.generated_tokens
            result.finish_reasons.append(out.finish_reason)
            text = clean_output(cutter.cut(code_of(raw))[0], final=True).rstrip("\n")
            done += lead + text + (trail if trail else "\n")
            if on_partial is not None:
                on_partial(done)
        result.text = done.rstrip("\n") + "\n" if done.strip() else ""
        result.seconds = time.monotonic() - t0
        log.info("translated %d chars %s->%s in %d pieces, %.2f s", len(code), source.id,
                 target.id, len(pieces), result.seconds)
        return result


def _split_space(piece: str) -> tuple[str, str, str]:
    """(blank lines before, the code, blank lines after): blank lines are kept as they
    are, so the translation keeps the source's spacing between definitions."""
    body = piece.strip("\n")
    if not body.strip():
        return piece, "", ""
    start = piece.index(body)
    return piece[:start], body, piece[start + len(body):]

