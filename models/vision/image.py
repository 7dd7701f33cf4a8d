"""Images from untrusted bytes, and the pixel preprocessing a checkpoint asks for.

`open_image` accepts PNG, JPEG, WebP, BMP and GIF (first frame) and nothing else; it
refuses oversized files and images whose pixel count exceeds a ceiling *before* decoding
them (decompression bombs), turns truncated or corrupt data into a clear error, applies the
EXIF orientation, composites transparency on white and returns 8-bit RGB.

`ImageProcessor` follows `preprocessor_config.json` the way transformers' PIL image
processors do (CLIP and SigLIP): resize (shortest edge, or a fixed height and width) with
the configured resampling filter, center crop, rescale (in float64, stored as float32),
normalize. `image_aspect_ratio: "pad"` (the original LLaVA recipe) first pads the image to
a square with the mean colour, so that wide screenshots are not cropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, RequestError

MAX_IMAGE_BYTES = 32 << 20
MAX_IMAGE_PIXELS = 40_000_000  # e.g. 8000 x 5000; a screenshot of four 4K screens fits
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class ImageError(RequestError):
    """Bytes that are not an acceptable image."""


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS,
               max_bytes: int = MAX_IMAGE_BYTES):  # -> PIL.Image.Image (RGB)
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(data, bytes | bytearray | memoryview):
        raise ImageError("image data must be bytes")
    if len(data) > max_bytes:
        raise ImageError(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    if len(data) == 0:
        raise ImageError("the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)), formats=list(FORMATS))
    except UnidentifiedImageError as e:
        raise ImageError("not an image in a supported format "
                         f"({', '.join(FORMATS)})") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"the image has too many pixels: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"the image cannot be read: {e}") from e
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        raise ImageError(f"the image is {w}x{h} pixels; the limit is {max_pixels} pixels")
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animations: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"the image is truncated or corrupt: {e}") from e


def _to_rgb(img):  # -> PIL.Image.Image
    from PIL import Image

    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image_file(path: Path, **limits: Any):  # -> PIL.Image.Image
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from e
    limit = limits.get("max_bytes", MAX_IMAGE_BYTES)
    if size > limit:
        raise ImageError(f"{path.name} is {size} bytes; the limit is {limit}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from e
    return open_image(data, **limits)


@dataclass(frozen=True)
class ImageProcessor:
    height: int
    width: int
    shortest_edge: int | None  # resize so the shorter side is this (then crop), else fixed
    resample: int
    crop: tuple[int, int] | None  # (height, width) of the center crop
    rescale: float | None
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    pad_to_square: bool = False

    @classmethod
    def from_dir(cls, directory: Path, default_size: int) -> ImageProcessor:
        path = directory / "preprocessor_config.json"
        cfg: dict[str, Any] = {}
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read {path}: {e}") from e
        return cls.from_dict(cfg, default_size)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], default_size: int) -> ImageProcessor:
        size = cfg.get("size", {"height": default_size, "width": default_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = cfg.get("crop_size")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        do_crop = bool(cfg.get("do_center_crop", False)) and crop is not None
        shortest = size.get("shortest_edge") if cfg.get("do_resize", True) else None
        if shortest is None and cfg.get("do_resize", True):
            height, width = int(size["height"]), int(size["width"])
        elif do_crop:
            height, width = int(crop["height"]), int(crop["width"])
        else:
            height = width = int(shortest or default_size)
        mean = cfg.get("image_mean") if cfg.get("do_normalize", True) else None
        std = cfg.get("image_std") if cfg.get("do_normalize", True) else None
        if isinstance(mean, int | float):
            mean = [mean] * 3
        if isinstance(std, int | float):
            std = [std] * 3
        try:
            return cls(
                height=height, width=width,
                shortest_edge=int(shortest) if shortest is not None else None,
                resample=int(cfg.get("resample", 3)),
                crop=(int(crop["height"]), int(crop["width"])) if do_crop else None,
                rescale=float(cfg.get("rescale_factor", 1 / 255))
                if cfg.get("do_rescale", True) else None,
                mean=tuple(float(m) for m in mean) if mean is not None else None,
                std=tuple(float(s) for s in std) if std is not None else None,
                pad_to_square=cfg.get("image_aspect_ratio") == "pad")
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"preprocessor_config.json is malformed: {e}") from e

    def __call__(self, img) -> torch.Tensor:
        """(3, height, width) float32 pixel values."""
        from PIL import Image

        if self.pad_to_square and img.width != img.height:
            side = max(img.size)
            fill = tuple(int(m * 255) for m in (self.mean or (0.5, 0.5, 0.5)))
            square = Image.new("RGB", (side, side), fill)
            square.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
            img = square
        if self.shortest_edge is not None:
            short, long = sorted(img.size)
            new_long = int(self.shortest_edge * long / short)
            size = ((self.shortest_edge, new_long) if img.width <= img.height
                    else (new_long, self.shortest_edge))
            img = img.resize(size, resample=self.resample)
        else:
            img = img.resize((self.width, self.height), resample=self.resample)
        arr = np.asarray(img).transpose(2, 0, 1)  # (3, H, W) uint8
        if self.crop is not None:
            arr = _center_crop(arr, *self.crop)
        x = arr.astype(np.float64)
        if self.rescale is not None:
            x = x * self.rescale
        x = x.astype(np.float32)
        if self.mean is not None and self.std is not None:
            mean = np.array(self.mean, dtype=np.float32)[:, None, None]
            std = np.array(self.std, dtype=np.float32)[:, None, None]
            x = (x - mean) / std
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def _center_crop(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    _, h, w = arr.shape
    if h < height or w < width:  # smaller than the crop: pad with zeros around it
        out = np.zeros((arr.shape[0], max(h, height), max(w, width)), dtype=arr.dtype)
        top, left = (out.shape[1] - h) // 2, (out.shape[2] - w) // 2
        out[:, top:top + h, left:left + w] = arr
        arr, h, w = out, out.shape[1], out.shape[2]
    top = (h - height) // 2
    left = (w - width) // 2
    return arr[:, top:top + height, left:left + width]


def content_key(pixels: torch.Tensor) -> int:
    """A negative 62-bit id for preprocessed pixels: the image's positions in a prompt carry
    it, so the prefix cache matches a repeated image exactly as it matches repeated text."""
    digest = hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).digest()
    return -1 - (int.from_bytes(digest[:8], "little") & ((1 << 62) - 1))
