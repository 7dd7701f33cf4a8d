"""A trainable Llama-architecture decoder whose parameter names are Hugging Face's.

`state_dict()` is exactly the `LlamaForCausalLM` checkpoint layout (tied embeddings, so no
`lm_head.weight`), which codevista's engine, `transformers` and llama.cpp converters load.
Training-only: no KV cache; the engine in `codevista.models` serves the result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..transformer import RMSNorm, rotate_half


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 704
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by heads and heads by kv heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config(self, eos_id: int) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False,
            "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": eos_id,
            "torch_dtype": "float32",
        }


class SelfAttention(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.s = s
        d, hd = s.hidden_size, s.head_dim
        self.q_proj = nn.Linear(d, s.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, s.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, s.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(s.num_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        s = self.s
        q = self.q_proj(x).view(B, T, s.num_heads, s.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=s.num_heads != s.num_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = SelfAttention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class CodeLM(nn.Module):
    def __init__(self, s: ModelShape) -> None:
        super().__init__()
        self.shape = s
        self.model = Backbone(s)
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2).float() / s.head_dim))
        freqs = torch.outer(torch.arange(s.max_position_embeddings).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scale = (std / math.sqrt(2 * self.shape.num_layers)
                         if name.endswith(("o_proj.weight", "down_proj.weight")) else std)
                nn.init.normal_(p, mean=0.0, std=scale)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                embeds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`embeds` (B, T, hidden), when given, replace the token embeddings (images)."""
        T = idx.shape[1]
        x = self.model.embed_tokens(idx) if embeds is None else embeds
        cos, sin = self.cos[:T], self.sin[:T]
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        logits = F.linear(self.model.norm(x), self.model.embed_tokens.weight)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def shape_of(directory: Path) -> ModelShape:
    """The decoder's shape from a code model's config.json or a Llava one's text_config."""
    cfg = json.loads((directory / "config.json").read_text())
    if cfg.get("model_type") == "llava":
        cfg = cfg["text_config"]
    return ModelShape(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                      num_layers=cfg["num_hidden_layers"],
                      num_heads=cfg["num_attention_heads"],
                      num_kv_heads=cfg["num_key_value_heads"],
                      intermediate_size=cfg["intermediate_size"],
                      max_position_embeddings=cfg["max_position_embeddings"],
                      rope_theta=cfg.get("rope_theta", 10000.0),
                      rms_norm_eps=cfg["rms_norm_eps"])


def export_hf(model: CodeLM, out: Path, tokenizer_dir: Path, eos_id: int,
              card: str | None = None, context: int | None = None) -> None:
    """Write an HF checkpoint directory (config, weights, tokenizer, generation config).
    `context`: the sequence length it was trained on, written as max_position_embeddings
    so that no loader feeds it positions it never saw (default: the shape's table size)."""
    import shutil

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.shape.hf_config(eos_id)
    if context is not None:
        config["max_position_embeddings"] = min(context, config["max_position_embeddings"])
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": False}, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    if card is not None:
        (out / "MODEL_CARD.md").write_text(card)
