"""A convolutional VQ image tokenizer: pixels <-> a grid of codebook indices.

The VQ-VAE recipe (van den Oord et al. 2017) in the small: a strided-conv encoder maps an
image to a (code_dim, H/f, W/f) grid, each vector is replaced by its nearest codebook entry
(cosine similarity on l2-normalised vectors, as ViT-VQGAN does, which keeps more of the
codebook in use), and a transposed-conv decoder maps the grid back to pixels. Training
passes gradients through the lookup with the straight-through estimator and adds the
codebook and commitment terms. Codes nobody picked since the last check are re-seeded from
encoder outputs of the current batch, and `usage()` reports the share of the codebook in
use, so a collapsed codebook shows in the logs rather than in blurry pictures.

Pixels are (B, 3, H, W) floats in [-1, 1]; codes are (B, H/f, W/f) int64.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class VQConfig:
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 64)  # one entry per resolution, halving between
    code_dim: int = 32
    codebook_size: int = 256
    beta: float = 0.25  # commitment weight

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) < 2 or any(c <= 0 for c in self.channels):
            raise ConfigError(f"channels must list two or more positive sizes, got "
                              f"{self.channels!r}")
        for name in ("image_size", "code_dim", "codebook_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.image_size % self.downsample:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of the "
                              f"downsampling factor {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def grid(self) -> int:
        """Codes per side of an image."""
        return self.image_size // self.downsample

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VQConfig:
        known = {k: d[k] for k in ("image_size", "channels", "code_dim", "codebook_size",
                                   "beta") if k in d}
        try:
            return cls(**known)
        except TypeError as e:
            raise ConfigError(f"image tokenizer config is malformed: {e}") from e


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(3, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for a, b in zip(ch, ch[1:], strict=False):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), ResBlock(b)]
        self.down = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch[-1], cfg.code_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.down(self.conv_in(x))))  # (B, D, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        ch = cfg.channels
        self.conv_in = nn.Conv2d(cfg.code_dim, ch[-1], 3, padding=1)
        layers: list[nn.Module] = []
        for b, a in zip(ch[::-1], ch[::-1][1:], strict=False):
            layers += [ResBlock(b), nn.ConvTranspose2d(b, a, 4, stride=2, padding=1)]
        self.up = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.up(self.conv_in(z))))  # (B, 3, H, W)


class Quantizer(nn.Module):
    """Nearest codebook entry by cosine similarity, straight-through gradients."""

    counts: torch.Tensor

    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.beta = cfg.beta
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, cfg.code_dim))
        # codes picked since the last reseed (a training-time monitor, not saved)
        self.register_buffer("counts", torch.zeros(cfg.codebook_size), persistent=False)
        self._last: torch.Tensor | None = None  # the latest batch's vectors, for reseeding

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) encoder vectors -> (N,) code indices."""
        return (F.normalize(z, dim=-1) @ F.normalize(self.codebook, dim=-1).t()).argmax(-1)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices of any shape -> their normalised code vectors (..., D)."""
        return F.normalize(self.codebook, dim=-1)[idx]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, D, h, w) -> (quantised z with straight-through gradient, indices (B, h, w),
        codebook + commitment loss)."""
        B, D, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, D), dim=-1)  # (N, D)
        idx = self.lookup(flat)
        q = self.embed(idx)  # (N, D)
        loss = F.mse_loss(q, flat.detach()) + self.beta * F.mse_loss(flat, q.detach())
        if self.training:
            self.counts += torch.bincount(idx, minlength=self.counts.numel()).float()
            self._last = flat.detach()
        q = flat + (q - flat).detach()  # straight-through: forward q, backward identity
        q = q.view(B, h, w, D).permute(0, 3, 1, 2)  # (B, D, h, w)
        return q, idx.view(B, h, w), loss

    def usage(self) -> float:
        """Share of the codebook picked since the last reseed."""
        return float((self.counts > 0).float().mean())

    @torch.no_grad()
    def reseed_dead(self, generator: torch.Generator | None = None) -> int:
        """Codes unused since the last call take the value of random encoder outputs of
        the latest batch (with a little noise); returns how many were re-seeded."""
        dead = (self.counts == 0).nonzero().flatten()
        last = self._last
        if len(dead) and last is not None:
            pick = torch.randint(0, last.shape[0], (len(dead),), generator=generator)
            noise = 0.01 * torch.randn(len(dead), last.shape[1], generator=generator)
            self.codebook[dead] = last[pick] + noise
        self.counts.zero_()
        return len(dead)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quantizer = Quantizer(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, indices, codebook + commitment loss)."""
        q, idx, vq_loss = self.quantizer(self.encoder(pixels))
        return self.decoder(q), idx, vq_loss

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, H/f, W/f) code indices."""
        return self.quantizer(self.encoder(pixels))[1]

    @torch.no_grad()
    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> (B, 3, H, W) pixels in [-1, 1]."""
        q = self.quantizer.embed(idx).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decoder(q).clamp(-1, 1)


# -- pixels <-> PIL, files ---------------------------------------------------------------

def to_pixels(images: list[Any]) -> torch.Tensor:
    """PIL images (RGB, all one size) -> (B, 3, H, W) in [-1, 1]."""
    import numpy as np

    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_images(pixels: torch.Tensor) -> list[Any]:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    from PIL import Image

    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two pixel batches in [-1, 1]."""
    mse = float(F.mse_loss((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2))
    return 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-10))).item()


WEIGHTS = "vq.safetensors"


def save_vq(model: VQModel, directory: Path) -> None:
    """Weights as safetensors; the config goes in the caller's config.json."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": "pt"})


def load_vq(directory: Path, cfg: VQConfig) -> VQModel:
    """The image tokenizer of a checkpoint directory, shape-checked, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import CheckpointNotFoundError, CorruptCheckpointError

    path = directory / WEIGHTS
    if not path.is_file():
        raise CheckpointNotFoundError(f"{directory} has no {WEIGHTS}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(f"{path.name} is not a valid safetensors file: {e}") from e
    model = VQModel(cfg)
    want = model.state_dict()
    for name, t in want.items():
        if name not in state:
            raise CorruptCheckpointError(f"{path.name} lacks tensor {name!r}")
        if tuple(state[name].shape) != tuple(t.shape):
            raise CorruptCheckpointError(
                f"tensor {name!r} has shape {list(state[name].shape)} but the config "
                f"implies {list(t.shape)}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def config_from_json(path: Path) -> VQConfig:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    section = data.get("image_tokenizer") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"{path} has no image_tokenizer section")
    return VQConfig.from_dict(section)
