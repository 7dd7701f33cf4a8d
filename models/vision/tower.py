"""Vision transformers of the CLIP and SigLIP families, and the LLaVA projector.

Matches transformers' `CLIPVisionModel` and `SiglipVisionModel` as LLaVA uses them: patch
embedding (a strided convolution), a class token (CLIP only), learned position embeddings,
a layer norm before the encoder (CLIP only), pre-norm encoder layers with biased q/k/v/out
projections and a two-layer MLP. `forward` returns the hidden states after the embeddings
and after every layer, as `output_hidden_states=True` does, since LLaVA reads an inner one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, UnsupportedArchitectureError

DEFAULTS = {  # transformers' defaults, for keys a config.json leaves out
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32,
                              num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, image_size=224, patch_size=16,
                                num_channels=3, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6),
}


@dataclass(frozen=True)
class VisionConfig:
    kind: str  # "clip" | "siglip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    act: str
    eps: float

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> VisionConfig:
        model_type = data.get("model_type", "clip_vision_model")
        if model_type in ("clip", "siglip"):
            model_type += "_vision_model"
        if model_type not in DEFAULTS:
            raise UnsupportedArchitectureError(
                f"unsupported vision tower {model_type!r}; supported: CLIP, SigLIP")
        d = {**DEFAULTS[model_type], **data}
        try:
            cfg = cls(kind=model_type.split("_")[0], hidden_size=int(d["hidden_size"]),
                      intermediate_size=int(d["intermediate_size"]),
                      num_layers=int(d["num_hidden_layers"]),
                      num_heads=int(d["num_attention_heads"]), image_size=int(d["image_size"]),
                      patch_size=int(d["patch_size"]), num_channels=int(d["num_channels"]),
                      act=str(d["hidden_act"]), eps=float(d["layer_norm_eps"]))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"vision_config is malformed: {e}") from e
        if cfg.hidden_size % cfg.num_heads or cfg.image_size % cfg.patch_size:
            raise ConfigError("vision_config: hidden_size must divide by the heads and "
                              "image_size by patch_size")
        return cfg

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def act_fn(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    if name == "relu":
        return F.relu(x)
    raise UnsupportedArchitectureError(f"unsupported activation {name!r}")


class _Attention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, T, self.heads, H // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                           split(self.v_proj(x)))
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H))


class _MLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.act = cfg.act
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(act_fn(self.act, self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Embeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        clip = cfg.kind == "clip"
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size,
                                         stride=cfg.patch_size, bias=not clip)
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size)) if clip else None
        n = cfg.num_patches + (1 if clip else 0)
        self.position_embedding = nn.Embedding(n, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # (B, patches, hidden)
        if self.class_embedding is not None:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            x = torch.cat([cls, x], dim=1)
        return x + self.position_embedding.weight[None]


class VisionTower(nn.Module):
    """Parameter names follow the checkpoint (below its `vision_model.` prefix)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.pre_layrnorm = (nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
                             if cfg.kind == "clip" else None)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, pixels: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """Hidden states [embeddings, layer 1, ..., layer `upto`] for pixels (B, C, H, W)."""
        x = self.embeddings(pixels)
        if self.pre_layrnorm is not None:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in list(self.encoder.layers)[:upto]:
            x = layer(x)
            states.append(x)
        return states


class Projector(nn.Module):
    """LLaVA's multi_modal_projector: linear, activation, linear."""

    def __init__(self, in_features: int, hidden: int, act: str, bias: bool) -> None:
        super().__init__()
        self.act = act
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(act_fn(self.act, self.linear_1(x)))
