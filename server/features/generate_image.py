"""Text to image: a prompt becomes a PNG inside the workspace, rows reported as decoded.

The image model (models/default/t2i, see models/vision/t2i.py) is its own engine, loaded
on first use like the vision model. The PNG is written only inside a workspace folder:
`outputUri` (a file: URI, an absolute path, or a path relative to the first workspace
folder) must resolve there with symlinks followed, else the request is refused; without
it the file goes to `<first folder>/generated-images/<words of the prompt>-<seed>.png`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from codevista.models.errors import ModelError
from codevista.models.vision.t2i import DEFAULT_T2I_DIR, TextToImage, check_size

from ..errors import ArgumentError, NotReadyError

log = logging.getLogger(__name__)

OUTPUT_DIR = "generated-images"
DEFAULT_SIZE = 256


@dataclass
class ImageResult:
    path: Path
    width: int
    height: int
    seed: int
    seconds: float
    tokens: int


def default_name(prompt: str, seed: int) -> str:
    words = re.findall(r"[a-z0-9]+", prompt.lower())[:6]
    return f"{'-'.join(words) or 'image'}-{seed}.png"


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_output(output: Any, prompt: str, seed: int, roots: list[Path]) -> Path:
    """Where the PNG goes: inside a workspace folder (symlinks followed), or an error."""
    if not roots:
        raise ArgumentError("open a workspace folder first: generated images are written "
                            "only inside the workspace")
    real_roots = [r.resolve() for r in roots]
    if output is None:
        target = roots[0] / OUTPUT_DIR / default_name(prompt, seed)
    elif not isinstance(output, str) or not output.strip():
        raise ArgumentError("'outputUri' must be a non-empty string")
    elif output.startswith("file:"):
        parsed = urlparse(output)
        if parsed.netloc not in ("", "localhost"):
            raise ArgumentError("'outputUri' on another host cannot be written")
        target = Path(unquote(parsed.path))
    elif re.match(r"^[a-zA-Z][\w+.-]*://", output):
        raise ArgumentError("'outputUri' must be a file: URI or a path")
    else:
        target = Path(output).expanduser()
        if not target.is_absolute():
            target = roots[0] / target
    if target.suffix.lower() != ".png":
        raise ArgumentError(f"'outputUri' must name a .png file, not {target.name!r}")
    resolved = target.resolve()  # follows symlinks of existing parts, folds '..'
    if not any(_inside(resolved, r) for r in real_roots):
        raise ArgumentError(f"{target} is outside the workspace: generated images are "
                            "written only inside a workspace folder")
    if resolved.is_dir():
        raise ArgumentError(f"{target} is a folder")
    return resolved


class ImageService:
    def __init__(self) -> None:
        self.model: TextToImage | None = None
        self.path: str | None = None
        self.error: str | None = None
        self._load: asyncio.Task[None] | None = None

    async def ensure(self, path: str | None, report: Callable[[str], None]) -> TextToImage:
        if path is None:
            if not (DEFAULT_T2I_DIR / "config.json").is_file():
                raise NotReadyError("no text-to-image model is installed "
                                    f"({DEFAULT_T2I_DIR} is missing)")
            path = str(DEFAULT_T2I_DIR)
        if path != self.path or self._load is None or (self._load.done() and self.error):
            self.close()
            self.path, self.error = path, None
            self._load = asyncio.ensure_future(self._do_load(path, report))
        await asyncio.shield(self._load)
        if self.model is None:
            raise NotReadyError(f"the image model could not be loaded: {self.error}")
        return self.model

    async def _do_load(self, path: str, report: Callable[[str], None]) -> None:
        report(f"loading {Path(path).name}")
        try:
            self.model = await asyncio.to_thread(TextToImage.load, path, True)
        except ModelError as e:
            self.error = str(e)
            log.error("image model load failed: %s", e)
        except Exception as e:  # an unexpected failure must not take the server down
            self.error = f"{type(e).__name__}: {e}"
            log.exception("image model load failed")

    async def generate(self, model: TextToImage, prompt: str, out: Path,
                       size: int | None = None, seed: int = 0,
                       on_rows: Callable[[int, int], None] | None = None,
                       guidance: float | None = None) -> ImageResult:
        """Generate, reporting `on_rows(done, total)` as rows complete; write the PNG.
        `guidance`: the classifier-free guidance scale (None: the checkpoint's)."""
        check_size(size)
        handle = model.submit(prompt, seed, guidance=guidance)
        grid, tokens = model.layout.grid, 0
        try:
            async for _ in handle.astream():  # one delta per image token, in order
                tokens += 1
                if on_rows is not None and tokens % grid == 0:
                    on_rows(tokens // grid, grid)
            result = await handle.aresult()
        except asyncio.CancelledError:
            handle.cancel()
            raise
        codes = model.codes_of(result)
        img = await asyncio.to_thread(model.decode, codes, size or DEFAULT_SIZE)
        await asyncio.to_thread(_write_png, img, out)
        log.info("image %s: %d tokens in %.2f s", out.name, result.generated_tokens,
                 result.total_s)
        return ImageResult(out, img.width, img.height, seed, result.total_s,
                           result.generated_tokens)

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
        self.model = None


def _write_png(img, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    img.save(tmp, format="PNG")
    tmp.replace(out)
