"""Image explanation with a LLaVA-family model, streamed.

The vision model is its own backend (a second engine): it is loaded on first use, so a
session that never asks about an image never pays for it, and reloaded when its setting
changes. The prompt is the checkpoint's chat template with an image entry in the user's
message when it has one, else LLaVA-1.5's `USER: <image>\\n... ASSISTANT:`.

Text in the image is read by OCR (server/ocr.py, the optional `ocr` extra) in a worker
thread: `transcribe` answers with the OCR's transcription alone (no vision model needed);
the other tasks get the OCR lines with their boxes in the prompt, between the image and
the question (`formats.ocr_context`), trimmed to the context left; a diagram's labels may
be kept to the words read (`ocr_label_constraint`). Without the extra,
those tasks go on from the image alone and `transcribe` says what to install.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from codevista.models import formats
from codevista.models.constrain import DiagramLabels
from codevista.models.engine import SamplingParams
from codevista.models.loader import DEFAULT_VLM_DIR

from .. import ocr
from ..backend import LocalBackend
from ..errors import NotReadyError
from ..vision import ImageRequestError, parse_boxes, question_for

log = logging.getLogger(__name__)


@dataclass
class Explanation:
    text: str
    task: str
    boxes: list[list[int]] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    transcription: str | None = None  # what the OCR read, laid out (None: no OCR ran)
    language: str | None = None  # the language the transcription looks like
    ocr_lines: list[tuple[str, list[int]]] = field(default_factory=list)  # 0-1000 boxes
    ocr_in_prompt: int = 0  # how many of the OCR lines the prompt held

    def ocr_fields(self) -> dict[str, Any]:
        """What the command result adds when OCR ran."""
        if self.transcription is None:
            return {}
        return {"transcription": self.transcription, "language": self.language,
                "lines": [{"text": t, "box": b} for t, b in self.ocr_lines]}


def _ocr_setting(loaded: Any, key: str) -> Any:
    """`key` of the checkpoint's config.json (None when absent or unreadable): how a
    checkpoint trained with OCR lines asks for them."""
    import json

    try:
        cfg = json.loads((loaded.path / "config.json").read_text(encoding="utf-8"))
        return cfg.get(key) if isinstance(cfg, dict) else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def ocr_prompt_tasks(loaded: Any) -> frozenset[str] | None:
    """The tasks whose prompts get the OCR lines (`ocr_prompt_tasks` in config.json); None,
    all of them, when absent. The embedded VLM was trained with lines only for
    `describe-diagram`: with lines in an `explain` prompt its explanations of error
    dialogs fell from 94 to 18 edit similarity. Other checkpoints read them as context."""
    tasks = _ocr_setting(loaded, "ocr_prompt_tasks")
    if not isinstance(tasks, list):
        return None
    return frozenset(t for t in tasks if isinstance(t, str))


def ocr_copy_bias(loaded: Any) -> float:
    """The logit bias a checkpoint asks for on the tokens of its OCR lines when it
    describes a diagram (`ocr_copy_bias` in its config.json; 0 when absent). The embedded
    VLM was trained to copy labels from OCR lines and sets it; other checkpoints read the
    lines as plain context."""
    try:
        bias = float(_ocr_setting(loaded, "ocr_copy_bias") or 0.0)
    except (ValueError, TypeError):
        return 0.0
    return bias if 0 < bias <= 20 else 0.0


def ocr_copy_bias_tasks(loaded: Any) -> frozenset[str]:
    """The tasks whose answers get the copy bias (`ocr_copy_bias_tasks` in config.json;
    `describe-diagram` when absent or malformed, the task the bias was first made for)."""
    tasks = _ocr_setting(loaded, "ocr_copy_bias_tasks")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        return frozenset({"describe-diagram"})
    return frozenset(tasks)


def ocr_logit_bias(tokenizer: Any, lines: list[tuple[str, list[int]]], bias: float,
                   first_word: bool = False) -> tuple[tuple[int, float], ...]:
    """`bias` on every token of the OCR lines' text as it is written after a space in an
    answer ("Nodes: jump, kick"): a soft copy mechanism that helps a small model quote
    the words it was shown rather than words it memorised. `first_word`: also as each
    word is written at the answer's start, with no space before it ("jump", the answer
    to "Which bar is the highest?")."""
    if bias <= 0 or not lines:
        return ()
    ids: set[int] = set()
    for text, _ in lines:
        ids.update(tokenizer.encode(" " + " ".join(text.split()), add_special_tokens=False))
        if first_word:
            for word in text.split():
                ids.update(tokenizer.encode(word, add_special_tokens=False))
    return tuple((i, bias) for i in sorted(ids))


def ocr_label_constraint(loaded: Any) -> bool:
    """Whether a diagram description keeps its labels to the words the OCR read
    (`ocr_label_constraint` in config.json: a checkpoint that answers `describe-diagram`
    in the `Nodes: ... . Edges: ... .` format of models/constrain.py). With it the
    embedded VLM's held-out edge F1 went from 55.0 to 91.0 (the copy bias alone)."""
    return _ocr_setting(loaded, "ocr_label_constraint") is True


OCR_MODEL = "PP-OCR (rapidocr)"
OCR_CACHE = 8  # images whose OCR is kept (transcribe, then explain, reads once)
ANSWER_ROOM = 128  # tokens kept for the answer when OCR lines fill the prompt


def vision_prompt(backend: LocalBackend, question: str, ocr_text: str = "") -> str:
    """The prompt text, holding the image token exactly once; `ocr_text` is an
    `formats.ocr_context` block, put before the question."""
    loaded = backend.loaded
    assert loaded is not None and loaded.vision is not None
    image = loaded.tokenizer.tok.id_to_token(loaded.vision.image_token_id) or "<image>"
    template = backend.chat_template
    if template is not None:
        question = ocr_text + question
        for content in ([{"type": "image"}, {"type": "text", "text": question}],
                        f"{image}\n{question}"):
            try:
                text = template.render([{"role": "user", "content": content}])
            except Exception:  # a template for string content only: try the next form
                continue
            if text.count(image) == 1:
                return text
    return formats.vision_prompt(question, image, ocr_text)


class VisionService:
    def __init__(self) -> None:
        self.backend = LocalBackend(cache_bytes=256 << 20)
        self.path: str | None = None
        self._load: asyncio.Task[None] | None = None
        self.ocr = ocr.OcrEngine()
        self._ocr_cache: OrderedDict[str, ocr.OcrResult] = OrderedDict()
        self._ocr_warned = False

    async def read_text(self, img, required: bool = False) -> ocr.OcrResult | None:
        """The OCR of an image (cached for a few images), or None when the OCR extra is
        not installed and the task can do without it."""
        if not ocr.available():
            if required:
                ocr.require("transcribe")
            if not self._ocr_warned:
                self._ocr_warned = True
                log.warning("OCR not installed (%s): images are explained without reading "
                            "their text", ocr.INSTALL_HINT)
            return None
        key = hashlib.sha256(f"{img.mode}{img.size}".encode() + img.tobytes()).hexdigest()
        if key in self._ocr_cache:
            self._ocr_cache.move_to_end(key)
            return self._ocr_cache[key]
        result = await self.ocr.aread(img)
        log.info("OCR: %d lines in %.2f s", len(result.lines), result.seconds)
        self._ocr_cache[key] = result
        while len(self._ocr_cache) > OCR_CACHE:
            self._ocr_cache.popitem(last=False)
        return result

    async def transcribe(self, img, on_partial: Callable[[str], None] | None = None
                         ) -> Explanation:
        """The `transcribe` task: the OCR's lines laid out as code, and their language."""
        result = await self.read_text(img, required=True)
        assert result is not None
        t = ocr.transcribe(result)
        if on_partial is not None and t.text.strip():
            on_partial(t.text)
        return Explanation(t.text, "transcribe", transcription=t.text, language=t.language,
                           ocr_lines=result.boxes_1000())

    @staticmethod
    def _with_ocr(answer: Explanation, result: ocr.OcrResult | None, held: int
                  ) -> Explanation:
        if result is not None:
            t = ocr.transcribe(result)
            answer.transcription, answer.language = t.text, t.language
            answer.ocr_lines, answer.ocr_in_prompt = result.boxes_1000(), held
        return answer

    async def ensure(self, path: str | None, report: Callable[[str], None]) -> LocalBackend:
        if path is None:
            if not (DEFAULT_VLM_DIR / "config.json").is_file():
                raise NotReadyError(
                    "no vision model is configured: set the visionModelPath setting to a "
                    "LLaVA-family checkpoint directory")
            path = str(DEFAULT_VLM_DIR)
        if path != self.path or self._load is None or (
                self._load.done() and self.backend.state == "error"):
            self.path = path
            self._load = asyncio.ensure_future(self.backend.load(path, "float32", report))
        await asyncio.shield(self._load)
        b = self.backend
        if b.state != "ready":
            raise NotReadyError(f"the vision model could not be loaded: {b.error}")
        if b.loaded is None or b.loaded.vision is None:
            raise NotReadyError(f"{path} is not a vision-language (LLaVA) checkpoint")
        return b

    async def explain(self, backend: LocalBackend, img, task: str, question: str | None,
                      on_partial: Callable[[str], None] | None = None,
                      max_tokens: int = 256, use_ocr: bool = True) -> Explanation:
        if task == "transcribe":
            return await self.transcribe(img, on_partial)
        loaded = backend.loaded
        assert loaded is not None and loaded.vision is not None
        q = question_for(task, question)
        read = await self.read_text(img) if use_ocr else None
        tok = loaded.tokenizer
        bos = (tok.tok.id_to_token(tok.bos_token_id) if tok.bos_token_id is not None
               else None)

        def encode(ocr_text: str) -> list[int]:
            text = vision_prompt(backend, q, ocr_text)
            # a rendered template that starts with BOS already has it
            return tok.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

        ids = encode("")
        if ids.count(loaded.vision.image_token_id) != 1:
            raise ImageRequestError("the prompt does not hold the image token exactly once")
        fixed = len(ids) + loaded.vision.tokens_per_image - 1
        lines = read.boxes_1000() if read is not None else []
        tasks = ocr_prompt_tasks(loaded)
        if tasks is not None and task not in tasks:
            lines = []  # read for the result's transcription, not put in the prompt
        held = 0
        if lines:  # as many OCR lines, in reading order, as leave room for the answer
            budget = backend.max_positions - fixed - min(max_tokens, ANSWER_ROOM)
            budget -= len(tok.encode(formats.OCR_HEADER + "\n", add_special_tokens=False))
            for t, b in lines:
                budget -= len(tok.encode(formats.ocr_line(t, b), add_special_tokens=False))
                if budget < 0:
                    break
                held += 1
            while held:
                with_ocr = encode(formats.ocr_context(lines[:held]))
                if backend.max_positions - (len(with_ocr) + loaded.vision.tokens_per_image
                                            - 1) >= min(max_tokens, ANSWER_ROOM):
                    ids = with_ocr
                    break
                held -= 1
        pixels = await asyncio.to_thread(loaded.vision.preprocess, img)
        room = backend.max_positions - (len(ids) + loaded.vision.tokens_per_image - 1)
        if room < 8:
            raise ImageRequestError("the question is too long for the vision model's context")
        # Words are quoted from the OCR lines the prompt holds (ocr_copy_bias, in the tasks
        # of ocr_copy_bias_tasks); diagram labels, for a checkpoint that asks for it, are
        # kept to them (ocr_label_constraint).
        diagram = task == "describe-diagram"
        bias = (ocr_logit_bias(tok, lines[:held], ocr_copy_bias(loaded), first_word=not diagram)
                if task in ocr_copy_bias_tasks(loaded) else ())
        constraint = (DiagramLabels(tok, [t for t, _ in lines[:held]])
                      if diagram and held and ocr_label_constraint(loaded) else None)
        params = SamplingParams(max_new_tokens=min(max_tokens, room), temperature=0.0,
                                stop_token_ids=backend.stop_ids(()), deadline_s=300.0,
                                logit_bias=bias, constraint=constraint)
        assert backend.engine is not None
        gen = backend.engine.submit(ids, params, images=[pixels])
        result = await _stream(gen, on_partial)
        answer = result.text.strip()
        log.info("image %s: %d prompt tokens (%d cached, %d of %d OCR lines), %d generated",
                 task, result.prompt_tokens, result.cached_tokens, held, len(lines),
                 result.generated_tokens)
        return self._with_ocr(Explanation(
            answer, task, parse_boxes(answer) if task == "locate" else [],
            result.prompt_tokens, result.cached_tokens, result.generated_tokens), read, held)

    async def explain_remote(self, backend, img, task: str, question: str | None,
                             on_partial: Callable[[str], None] | None = None,
                             max_tokens: int = 256) -> Explanation:
        """The same task on a served vision-language model (`visionModel` of a remote
        backend): the image, re-encoded as PNG from the decoded pixels (no metadata, no
        bytes the user did not see), goes as an `image_url` data URL; the OCR lines (at
        most REMOTE_OCR_LINES) go before the question."""
        if task == "transcribe":
            return await self.transcribe(img, on_partial)
        read = await self.read_text(img)
        lines = read.boxes_1000()[:REMOTE_OCR_LINES] if read is not None else []
        url = await asyncio.to_thread(image_data_url, img)
        text = formats.ocr_context(lines) + question_for(task, question)
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text}]}]
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
        gen = backend.submit_chat(messages, params, vision=True)
        result = await _stream(gen, on_partial)
        answer = result.text.strip()
        return self._with_ocr(Explanation(
            answer, task, parse_boxes(answer) if task == "locate" else [],
            result.prompt_tokens, result.cached_tokens, 0), read, len(lines))

    def close(self) -> None:
        self.backend.close()


async def _stream(gen, on_partial: Callable[[str], None] | None):
    """Relay a generation's text so far to `on_partial`; its result, or its error raised.
    Cancelling the caller cancels the generation."""
    out = ""
    try:
        async for delta in gen.astream():
            out += delta
            if on_partial is not None and out.strip():
                on_partial(out)
        result = await gen.aresult()
    except asyncio.CancelledError:
        gen.cancel()
        raise
    if result.error is not None:
        raise result.error
    return result


REMOTE_OCR_LINES = 200
MAX_REMOTE_SIDE = 1536  # served VLMs tile or resize anyway; this bounds the request size


def image_data_url(img) -> str:
    import base64
    import io

    from PIL import Image

    if max(img.size) > MAX_REMOTE_SIDE:
        img = img.copy()
        img.thumbnail((MAX_REMOTE_SIDE, MAX_REMOTE_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
