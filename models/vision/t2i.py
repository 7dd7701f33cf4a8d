"""Text to image on the engine: a decoder writes an image's codes, a VQ decoder paints them.

A checkpoint directory (models/default/t2i) is a Llama decoder in the Hugging Face
layout whose vocabulary is a text tokenizer's plus one token per codebook entry and
begin/end-image tokens, with two extra sections in config.json (`image_tokenizer`: the
VQ shape; `image_generation`: the token ids and the sequence layout) and the image
tokenizer's weights in vq.safetensors.

Generation is an ordinary engine request: the prompt, left-padded to the fixed prompt
length the model was trained with, then begin-image; `grid * grid` new tokens sampled
from the codebook's id range only (`SamplingParams.token_range`), so the KV cache,
streaming, cancellation and deadlines are the engine's. With classifier-free guidance
(`guidance` > 1; the checkpoint's default is `image_generation.guidance_scale`), the
engine runs the empty prompt beside the request and samples from the logits pushed away
from it; only checkpoints trained with dropped prompts give a meaningful empty-prompt
distribution. Rows are complete every `grid`
tokens (each code token streams as one text delta, `<|img_N|>`); `decode` turns the
codes into pixels.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import read_config
from ..engine import Engine, GenerationResult, RequestHandle, SamplingParams
from ..errors import ConfigError, ModelError, RequestError
from ..loader import LoadedModel, load_model
from .vq import VQConfig, VQModel, load_vq, to_images

DEFAULT_T2I_DIR = Path(__file__).resolve().parents[1] / "default" / "t2i"
MIN_SIZE, MAX_SIZE = 16, 1024
MAX_GUIDANCE = 20.0


@dataclass(frozen=True)
class ImageLayout:
    """How a prompt and an image's codes are laid out in the decoder's sequence."""

    prompt_tokens: int
    pad_token_id: int
    image_start_token_id: int
    first_code_token_id: int
    codebook_size: int
    grid: int
    image_size: int

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> ImageLayout:
        section = data.get("image_generation")
        if not isinstance(section, dict):
            raise ConfigError("config.json has no image_generation section: not a "
                              "text-to-image checkpoint")
        try:
            out = cls(**{k: int(section[k]) for k in (
                "prompt_tokens", "pad_token_id", "image_start_token_id",
                "first_code_token_id", "codebook_size", "grid", "image_size")})
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"image_generation section is malformed: {e!s}") from e
        if min(out.prompt_tokens, out.codebook_size, out.grid, out.image_size) <= 0:
            raise ConfigError("image_generation sizes must be positive")
        return out

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def code_range(self) -> tuple[int, int]:
        return self.first_code_token_id, self.first_code_token_id + self.codebook_size


@dataclass
class GeneratedImage:
    image: Any  # PIL.Image.Image at the requested size
    codes: torch.Tensor  # (grid, grid) codebook indices
    result: GenerationResult


class TextToImage:
    """A loaded text-to-image checkpoint and its engine."""

    def __init__(self, loaded: LoadedModel, vq: VQModel, layout: ImageLayout,
                 engine: Engine, guidance: float = 1.0) -> None:
        self.loaded, self.vq, self.layout, self.engine = loaded, vq, layout, engine
        self.guidance = guidance  # the checkpoint's default guidance scale (1: off)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_T2I_DIR, warmup: bool = False,
             num_threads: int | None = None) -> TextToImage:
        directory = Path(path).expanduser()
        raw = read_config(directory / "config.json")
        layout = ImageLayout.from_config(raw)
        section = raw.get("image_tokenizer")
        if not isinstance(section, dict):
            raise ConfigError("config.json has no image_tokenizer section")
        vq_cfg = VQConfig.from_dict(section)
        if vq_cfg.grid != layout.grid or vq_cfg.codebook_size != layout.codebook_size:
            raise ConfigError("image_tokenizer and image_generation disagree on the grid or "
                              "the codebook size")
        loaded = load_model(directory)
        lo, hi = layout.code_range
        if hi > loaded.config.vocab_size:
            raise ConfigError(f"image codes {lo}-{hi} lie outside the vocabulary "
                              f"({loaded.config.vocab_size})")
        if layout.prompt_tokens + 1 + layout.tokens > loaded.model.max_positions:
            raise ConfigError("the model's context is too short for a prompt and an image")
        guidance = raw["image_generation"].get("guidance_scale", 1.0)
        try:
            check_guidance(guidance)
        except RequestError as e:
            raise ConfigError(f"image_generation.guidance_scale: {e}") from e
        vq = load_vq(directory, vq_cfg)
        engine = Engine(loaded, cache_bytes=64 << 20, warmup=warmup,
                        num_threads=num_threads).start()
        return cls(loaded, vq, layout, engine, float(guidance))

    def close(self) -> None:
        self.engine.shutdown()

    # -- requests ------------------------------------------------------------------------
    def prompt_ids(self, prompt: str) -> list[int]:
        """Padding, the prompt's tokens, begin-image."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("the prompt is empty")
        ids = self.loaded.tokenizer.encode(prompt.strip(), add_special_tokens=False)
        n = self.layout.prompt_tokens
        if len(ids) > n:
            raise RequestError(f"the prompt is too long for the image model: {len(ids)} "
                               f"tokens, at most {n}")
        return self._framed(ids)

    def unconditional_ids(self) -> list[int]:
        """The empty prompt (padding only, then begin-image) that guidance contrasts with."""
        return self._framed([])

    def _framed(self, ids: list[int]) -> list[int]:
        return ([self.layout.pad_token_id] * (self.layout.prompt_tokens - len(ids)) + ids
                + [self.layout.image_start_token_id])

    def params(self, seed: int | None = None, temperature: float | None = None,
               top_k: int | None = None, deadline_s: float | None = None,
               guidance: float | None = None) -> SamplingParams:
        """Sampling restricted to the codebook; what is not given comes from the
        checkpoint's generation_config.json and config.json (guidance). Greedy is top_k=1
        (at temperature 1)."""
        d = self.loaded.defaults
        if temperature is None:
            temperature = d.temperature if d.temperature > 0 else 1.0
        if top_k is None:
            top_k = d.top_k if d.temperature > 0 else 1
        if not temperature > 0:
            raise RequestError("temperature must be positive (use top_k=1 for greedy)")
        if guidance is None:
            guidance = self.guidance
        check_guidance(guidance)
        return SamplingParams(max_new_tokens=self.layout.tokens, temperature=temperature,
                              top_k=top_k, seed=seed, ignore_eos=True,
                              token_range=self.layout.code_range, deadline_s=deadline_s,
                              guidance_prompt=tuple(self.unconditional_ids())
                              if guidance != 1 else None,
                              guidance_scale=float(guidance))

    def submit(self, prompt: str, seed: int | None = None, **sampling: Any) -> RequestHandle:
        return self.engine.submit(self.prompt_ids(prompt), self.params(seed, **sampling))

    def codes_of(self, result: GenerationResult) -> torch.Tensor:
        """The (grid, grid) code grid of a finished request, or an error saying why not."""
        if result.error is not None:
            raise result.error
        if result.finish_reason == "cancelled":
            raise RequestError("image generation was cancelled")
        if result.finish_reason == "deadline":
            raise RequestError("image generation ran out of time")
        lo, hi = self.layout.code_range
        ids = result.token_ids
        if len(ids) != self.layout.tokens or any(not lo <= t < hi for t in ids):
            raise ModelError(f"generation ended after {len(ids)} of {self.layout.tokens} "
                             f"image tokens ({result.finish_reason})")
        g = self.layout.grid
        return (torch.tensor(ids) - lo).view(g, g)

    def decode(self, codes: torch.Tensor, size: int | None = None):
        """(grid, grid) codes -> a PIL image, resized to `size` pixels square if given."""
        from PIL import Image

        with torch.inference_mode():
            img = to_images(self.vq.decode(codes.unsqueeze(0)))[0]
        if size is not None and size != img.width:
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        return img

    def generate(self, prompt: str, seed: int | None = None, size: int | None = None,
                 on_rows: Callable[[int, int], None] | None = None,
                 timeout: float | None = None, **sampling: Any) -> GeneratedImage:
        """Blocking generation; `on_rows(done, total)` after each completed row."""
        check_size(size)
        handle = self.submit(prompt, seed, **sampling)
        tokens = 0
        for _ in handle:  # one text delta per code token, in order
            tokens += 1
            if on_rows is not None and tokens % self.layout.grid == 0:
                on_rows(tokens // self.layout.grid, self.layout.grid)
        result = handle.result(timeout)
        codes = self.codes_of(result)
        return GeneratedImage(self.decode(codes, size), codes, result)


def check_guidance(guidance: Any) -> None:
    if (not isinstance(guidance, (int, float)) or isinstance(guidance, bool)
            or not 0 < guidance <= MAX_GUIDANCE):
        raise RequestError(f"guidance must be a number in (0, {MAX_GUIDANCE}] (1: off), got "
                           f"{guidance!r}")


def check_size(size: Any) -> None:
    if size is None:
        return
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_SIZE <= size <= MAX_SIZE:
        raise RequestError(f"size must be an integer from {MIN_SIZE} to {MAX_SIZE} pixels, "
                           f"got {size!r}")


def is_t2i_checkpoint(path: Path) -> bool:
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "image_generation" in data
