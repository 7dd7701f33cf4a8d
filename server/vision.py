"""Image explanation requests: where the image comes from, which task, which prompt.

Images are untrusted and so are their paths: a `uri` or `path` must resolve (symlinks
followed) inside one of the workspace folders or a folder the user allowed in settings;
`data` is base64 with a size ceiling. Decoding is models/vision/image.py's.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from codevista.models import formats
from codevista.models.vision.image import MAX_IMAGE_BYTES, ImageError, load_image_file, open_image

TASKS = formats.VISION_TASKS


class ImageRequestError(ValueError):
    """An explainImage request that cannot be served as asked (bad source, task, path)."""


@dataclass(frozen=True)
class ImageSource:
    kind: str  # "uri" | "path" | "data"
    label: str  # what to call it in messages (never the data itself)


def resolve_task(task: object) -> str:
    task = "explain" if task is None else task
    if task not in TASKS:
        raise ImageRequestError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return str(task)


def question_for(task: str, question: str | None) -> str:
    try:
        return formats.vision_question(task, question)
    except ValueError as e:
        raise ImageRequestError(str(e)) from e


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def _path_from_uri(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ImageRequestError(f"only file: URIs can be read, not {parsed.scheme or '?'}:")
    if parsed.netloc not in ("", "localhost"):
        raise ImageRequestError("file: URIs on other hosts are not read")
    return Path(unquote(parsed.path))


def load_image(spec: object, roots: list[Path], max_bytes: int = MAX_IMAGE_BYTES):
    """The decoded RGB image a request's `image` object names, and where it came from."""
    if not isinstance(spec, dict):
        raise ImageRequestError("'image' must be an object with one of uri, path or data")
    given = [k for k in ("uri", "path", "data") if spec.get(k) is not None]
    if len(given) != 1:
        raise ImageRequestError("'image' needs exactly one of uri, path or data")
    kind = given[0]
    value = spec[kind]
    if not isinstance(value, str):
        raise ImageRequestError(f"image.{kind} must be a string")
    if kind == "data":
        text = re.sub(r"^data:[\w/+.-]+;base64,", "", value.strip())
        if len(text) > (max_bytes * 4) // 3 + 8:
            raise ImageError(f"the image data is larger than {max_bytes} bytes")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageRequestError(f"image.data is not valid base64: {e}") from e
        return open_image(data, max_bytes=max_bytes), ImageSource("data", "pasted image")
    raw = _path_from_uri(value) if kind == "uri" else Path(value).expanduser()
    if not raw.is_absolute():
        if not roots:
            raise ImageRequestError("a relative image path needs a workspace folder")
        raw = roots[0] / raw
    try:
        real = Path(os.path.realpath(raw, strict=True))
    except (OSError, RuntimeError) as e:
        raise ImageRequestError(f"image {raw.name or raw} not found") from e
    resolved_roots = [Path(os.path.realpath(r)) for r in roots]
    if not _inside(real, resolved_roots):
        raise ImageRequestError(
            f"{raw} is outside the workspace folders; add its folder to the "
            "allowedImageRoots setting to read it")
    if not real.is_file():
        raise ImageRequestError(f"{raw} is not a file")
    return load_image_file(real, max_bytes=max_bytes), ImageSource(kind, real.name)


def parse_boxes(text: str) -> list[list[int]]:
    """Boxes `[x1, y1, x2, y2]` in an answer, clamped to 0-1000 and ordered."""
    boxes = []
    for m in re.finditer(r"\[\s*(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*,\s*"
                         r"(\d+(?:\.\d+)?)\s*,\s*(\d+(?:\.\d+)?)\s*\]", text):
        x1, y1, x2, y2 = (min(1000, max(0, round(float(v)))) for v in m.groups())
        boxes.append([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)])
    return boxes
