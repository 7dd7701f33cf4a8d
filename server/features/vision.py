"""Image explanation with a LLaVA-family model, streamed.

The vision model is its own backend (a second engine): it is loaded on first use, so a
session that never asks about an image never pays for it, and reloaded when its setting
changes. The prompt is the checkpoint's chat template with an image entry in the user's
message when it has one, else LLaVA-1.5's `USER: <image>\\n... ASSISTANT:`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from codevista.models import formats
from codevista.models.engine import SamplingParams
from codevista.models.loader import DEFAULT_VLM_DIR

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


def vision_prompt(backend: LocalBackend, question: str) -> str:
    """The prompt text, holding the image token exactly once."""
    loaded = backend.loaded
    assert loaded is not None and loaded.vision is not None
    image = loaded.tokenizer.tok.id_to_token(loaded.vision.image_token_id) or "<image>"
    template = backend.chat_template
    if template is not None:
        for content in ([{"type": "image"}, {"type": "text", "text": question}],
                        f"{image}\n{question}"):
            try:
                text = template.render([{"role": "user", "content": content}])
            except Exception:  # a template for string content only: try the next form
                continue
            if text.count(image) == 1:
                return text
    return formats.vision_prompt(question, image)


class VisionService:
    def __init__(self) -> None:
        self.backend = LocalBackend(cache_bytes=256 << 20)
        self.path: str | None = None
        self._load: asyncio.Task[None] | None = None

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
                      max_tokens: int = 256) -> Explanation:
        loaded = backend.loaded
        assert loaded is not None and loaded.vision is not None
        text = vision_prompt(backend, question_for(task, question))
        tok = loaded.tokenizer
        bos = (tok.tok.id_to_token(tok.bos_token_id) if tok.bos_token_id is not None
               else None)
        # a rendered template that starts with BOS already has it
        ids = tok.encode(text, add_special_tokens=not (bos and text.startswith(bos)))
        if ids.count(loaded.vision.image_token_id) != 1:
            raise ImageRequestError("the prompt does not hold the image token exactly once")
        pixels = await asyncio.to_thread(loaded.vision.preprocess, img)
        room = backend.max_positions - (len(ids) + loaded.vision.tokens_per_image - 1)
        if room < 8:
            raise ImageRequestError("the question is too long for the vision model's context")
        params = SamplingParams(max_new_tokens=min(max_tokens, room), temperature=0.0,
                                stop_token_ids=backend.stop_ids(()), deadline_s=300.0)
        assert backend.engine is not None
        gen = backend.engine.submit(ids, params, images=[pixels])
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
        answer = result.text.strip()
        log.info("image %s: %d prompt tokens (%d cached), %d generated", task,
                 result.prompt_tokens, result.cached_tokens, result.generated_tokens)
        return Explanation(answer, task, parse_boxes(answer) if task == "locate" else [],
                           result.prompt_tokens, result.cached_tokens,
                           result.generated_tokens)

    async def explain_remote(self, backend, img, task: str, question: str | None,
                             on_partial: Callable[[str], None] | None = None,
                             max_tokens: int = 256) -> Explanation:
        """The same task on a served vision-language model (`visionModel` of a remote
        backend): the image, re-encoded as PNG from the decoded pixels (no metadata, no
        bytes the user did not see), goes as an `image_url` data URL."""
        url = await asyncio.to_thread(image_data_url, img)
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": question_for(task, question)}]}]
        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0)
        gen = backend.submit_chat(messages, params, vision=True)
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
        answer = result.text.strip()
        return Explanation(answer, task, parse_boxes(answer) if task == "locate" else [],
                           result.prompt_tokens, result.cached_tokens, 0)

    def close(self) -> None:
        self.backend.close()


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
