"""Model configuration: one frozen dataclass built from a Hugging Face ``config.json``.

Covers the decoder families real code models use: Llama (DeepSeek-Coder, CodeLlama),
Qwen2 (Qwen2.5-Coder) and Starcoder2 (StarCoder2). The family decides the defaults
of the fields a config.json may leave out; nothing is guessed from names or paths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnsupportedArchitectureError

# architecture name in config.json -> family
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Starcoder2ForCausalLM": "starcoder2",
}
MODEL_TYPES: dict[str, str] = {"llama": "llama", "qwen2": "qwen2", "starcoder2": "starcoder2"}
ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu", "gelu_new")


@dataclass(frozen=True)
class DecoderConfig:
    family: str  # "llama" | "qwen2" | "starcoder2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    norm: str = "rms"  # "rms" | "layer" (LayerNorm with bias)
    norm_eps: float = 1e-6
    mlp: str = "gated"  # "gated" (down(act(gate) * up)) | "plain" (c_proj(act(c_fc)))
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # linear position interpolation
    tie_word_embeddings: bool = False
    # Per layer: None for full attention, else the window (keys with q - k < window).
    layer_windows: tuple[int | None, ...] = field(default=())
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.head_dim == 0:
            if self.hidden_size % self.num_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even integer, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_heads} is not a multiple of "
                f"num_key_value_heads {self.num_kv_heads}")
        if self.norm not in ("rms", "layer"):
            raise ConfigError(f"unknown norm {self.norm!r}")
        if self.mlp not in ("gated", "plain"):
            raise ConfigError(f"unknown mlp {self.mlp!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"activation {self.hidden_act!r} is not supported "
                f"(supported: {', '.join(ACTIVATIONS)})")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm epsilon must be positive, got {self.norm_eps}")
        if not self.rope_theta > 0 or not self.rope_scaling_factor > 0:
            raise ConfigError("rope_theta and the rope scaling factor must be positive")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (None,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ConfigError(
                f"{len(self.layer_windows)} layer types for {self.num_layers} layers")
        for w in self.layer_windows:
            if w is not None and (not isinstance(w, int) or w <= 0):
                raise ConfigError(f"sliding window must be a positive integer, got {w!r}")
        for tid in (self.bos_token_id, self.pad_token_id, *self.eos_token_ids):
            if tid is not None and not 0 <= tid < self.vocab_size:
                raise ConfigError(f"special token id {tid} is outside the vocabulary "
                                  f"(vocab_size {self.vocab_size})")

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes of K and V one token occupies across all layers."""
        return 2 * self.num_layers * self.kv_dim * element_size

    @classmethod
    def from_file(cls, path: str | Path) -> DecoderConfig:
        return cls.from_hf(read_config(Path(path)))

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> DecoderConfig:
        """Build from the dict of a Hugging Face config.json (transformers 4 or 5 layout)."""
        family = _family(data)
        try:
            return _build(family, data)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"config.json is malformed: {e!s}") from e


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict, or a ConfigError saying why not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return data


def _family(data: dict[str, Any]) -> str:
    archs = data.get("architectures") or []
    if isinstance(archs, list):
        for arch in archs:
            if arch in ARCHITECTURES:
                return ARCHITECTURES[arch]
    model_type = data.get("model_type")
    if not archs and model_type in MODEL_TYPES:
        return MODEL_TYPES[model_type]
    named = ", ".join(map(str, archs)) if archs else f"model_type {model_type!r}"
    raise UnsupportedArchitectureError(
        f"unsupported architecture {named}; supported: {', '.join(ARCHITECTURES)}")


def _rope(data: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, linear factor) from either `rope_theta`+`rope_scaling` or `rope_parameters`."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise ConfigError("rope_parameters / rope_scaling must be objects")
    theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), 1.0
    if rope_type == "linear":
        return float(theta), float(merged["factor"])
    raise UnsupportedArchitectureError(
        f"rope scaling type {rope_type!r} is not supported (supported: default, linear)")


def _windows(family: str, data: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    if family == "llama":
        return (None,) * num_layers
    window = data.get("sliding_window")
    if family == "qwen2":
        if not data.get("use_sliding_window", False):
            window = None
    if window is None:
        return (None,) * num_layers
    layer_types = data.get("layer_types")
    if family == "qwen2" and layer_types is None:
        first = int(data.get("max_window_layers", 28))
        layer_types = ["sliding_attention" if i >= first else "full_attention"
                       for i in range(num_layers)]
    if layer_types is None:
        return (int(window),) * num_layers
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)


def _build(family: str, d: dict[str, Any]) -> DecoderConfig:
    num_layers = d["num_hidden_layers"]
    num_heads = d["num_attention_heads"]
    theta, factor = _rope(d)
    common: dict[str, Any] = dict(
        family=family,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=d.get("num_key_value_heads") or num_heads,
        intermediate_size=d["intermediate_size"],
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        head_dim=d.get("head_dim") or 0,
        hidden_act=d.get("hidden_act", "silu"),
        rope_theta=theta,
        rope_scaling_factor=factor,
        layer_windows=_windows(family, d, num_layers),
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_ids(d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )
    if d.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError("partial rotary embeddings are not supported")
    if family == "llama":
        bias = bool(d.get("attention_bias", False))
        return DecoderConfig(**common, norm="rms", norm_eps=d.get("rms_norm_eps", 1e-6),
                             mlp="gated", qkv_bias=bias, o_bias=bias,
                             mlp_bias=bool(d.get("mlp_bias", False)),
                             tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
    if family == "qwen2":
        return DecoderConfig(**common, norm="rms", norm_eps=d.get("rms_norm_eps", 1e-6),
                             mlp="gated", qkv_bias=True, o_bias=False, mlp_bias=False,
                             tie_word_embeddings=bool(d.get("tie_word_embeddings", False)))
    # starcoder2
    bias = bool(d.get("use_bias", True))
    common["hidden_act"] = d.get("hidden_act", "gelu_pytorch_tanh")
    return DecoderConfig(**common, norm="layer", norm_eps=d.get("norm_epsilon", 1e-5),
                         mlp="plain", qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                         tie_word_embeddings=bool(d.get("tie_word_embeddings", True)))
