"""Decoder-only transformer for the Llama, Qwen2 and Starcoder2 families.

Matches the `transformers` implementations `LlamaForCausalLM`, `Qwen2ForCausalLM` and
`Starcoder2ForCausalLM` (pre-norm blocks, rotate-half RoPE, GQA), with two layout
changes for speed: q/k/v are one projection (`wqkv`) and, for gated MLPs, gate and up
are one projection (`w_gate_up`). The loader concatenates the checkpoint's tensors.

Linear weights have one of two layouts. Float32 weights on a CPU our C kernel supports
(models/native.py) keep the checkpoint's (out, in) rows: products of up to 16 rows (decode
steps, draft verification) run in the kernel, which streams each row of W once on every
core; longer inputs use torch's matmul. Otherwise they are stored as column blocks,
(blocks, in, out / blocks), one block per CPU thread, and applied with one batched matmul,
which streams far faster than one large torch GEMV (measured with MKL on 2 cores,
Qwen2.5-Coder-0.5B shape: a decode step 113-144 ms -> 76-92 ms; prefill unchanged). With
tied embeddings the LM head's matrix serves as the embedding table too (a row lookup).

`forward_many` runs several sequences (each with its own cache and position) in one
pass: the engine batches concurrent requests so the weights are read once per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import native
from .config import DecoderConfig
from .kv_cache import KVCache
from .quant import Int8Linear

KERNEL_ROWS = 16  # the most rows of x our kernel takes (cv_int8_max_rows)
ROWS = 0  # `blocks` for the row layout: W as (out, in), products of few rows in our kernel


def default_blocks() -> int:
    """Column blocks for linear weights: one per intra-op thread (at most 8)."""
    return max(1, min(8, torch.get_num_threads()))


def layout_for(dtype: torch.dtype, device: str | torch.device) -> int:
    """The `blocks` a model loaded with these weights should use: ROWS for float32 on a CPU
    where our float32 kernel builds, column blocks otherwise."""
    if dtype == torch.float32 and torch.device(device).type == "cpu":
        if native.float_kernel() is not None:
            return ROWS
    return default_blocks()


class Linear(nn.Module):
    """y = x @ W.T + bias for an HF-layout W (out, in), stored as (out, in) (blocks = ROWS)
    or as column blocks (blocks, in, out / blocks)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, blocks: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if blocks == ROWS:
            self.blocks = ROWS
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        else:
            self.blocks = blocks if out_features % blocks == 0 else 1
            self.weight = nn.Parameter(
                torch.empty(self.blocks, in_features, out_features // self.blocks))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def pack(self, w: torch.Tensor) -> torch.Tensor:
        """HF layout (out, in) -> ours."""
        if self.blocks == ROWS:
            return w.contiguous()
        n = self.out_features // self.blocks
        return w.t().reshape(self.in_features, self.blocks, n).permute(1, 0, 2).contiguous()

    def unpack(self) -> torch.Tensor:
        """Ours -> HF layout (out, in)."""
        if self.blocks == ROWS:
            return self.weight
        return self.weight.permute(0, 2, 1).reshape(self.out_features, self.in_features)

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of the HF-layout weight W[idx] (len(idx), in), e.g. embedding vectors."""
        if self.blocks == ROWS:
            return self.weight[idx]
        n = self.out_features // self.blocks
        return self.weight[idx // n, :, idx % n]

    def _rows_kernel(self, x: torch.Tensor):
        """cv_f32_gemm if this product should run in our kernel, else None."""
        w = self.weight
        ops = small_ops(x) if x.shape[0] <= KERNEL_ROWS else None
        if ops is None or w.dtype != torch.float32 or w.device.type != "cpu":
            return None
        return ops.cv_f32_gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        if self.blocks == ROWS:
            gemm = self._rows_kernel(x)
            if gemm is None:
                return F.linear(x, self.weight, self.bias)
            x = x.contiguous()
            y = torch.empty(T, self.out_features)
            if gemm(x.data_ptr(), T, self.in_features, self.weight.data_ptr(),
                    None if self.bias is None else self.bias.data_ptr(), y.data_ptr(),
                    self.out_features, native.kernel_threads()) != 0:
                raise RuntimeError("float32 kernel rejected its arguments")
            return y
        if self.blocks == 1:
            y = x @ self.weight[0]  # (T, out)
        else:
            y = torch.bmm(x.expand(self.blocks, T, self.in_features), self.weight)  # (B, T, n)
            y = y.transpose(0, 1).reshape(T, self.out_features)  # (T, out)
        if self.bias is not None:
            y += self.bias
        return y


_small_ops = None


def small_ops(x: torch.Tensor):
    """Our C library if the small operations on `x` should run in it (float32 on the CPU,
    no gradient, and the library builds here), else None."""
    global _small_ops
    if x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    if _small_ops is None:
        _small_ops = native.float_kernel() or False
    return _small_ops or None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (the recipe's model normalizes (batch, time, hidden): torch code for those)
        ops = small_ops(x) if x.dim() == 2 and x.shape[0] <= KERNEL_ROWS else None
        if ops is not None:  # a decode step: one call instead of six operators
            x = x.contiguous()
            y = torch.empty_like(x)
            ops.cv_rmsnorm(x.data_ptr(), self.weight.data_ptr(), y.data_ptr(), x.shape[0],
                           x.shape[1], self.eps)
            return y
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(cfg: DecoderConfig) -> nn.Module:
    if cfg.norm == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return F.silu(x)
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return F.gelu(x, approximate="tanh")
    return F.gelu(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# Draft verification segments up to this long compute attention row by row, exactly like
# decode steps (prompt lookup drafts are at most 8 tokens plus the pending one).
VERIFY_ROWS = 16


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, blocks: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = cfg.layer_windows[layer]
        self.wqkv = Linear(cfg.hidden_size, cfg.q_dim + 2 * cfg.kv_dim, cfg.qkv_bias, blocks)
        self.wo = Linear(cfg.q_dim, cfg.hidden_size, cfg.o_bias, blocks)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segs: list[Segment], masks: list[dict]) -> torch.Tensor:
        """x (T, hidden) holds the tokens of every segment back to back; the projections
        run once over all of them (one pass over the weights), attention per segment
        against its own cache."""
        qkv = self.wqkv(x)  # (T, q_dim + 2 kv_dim)
        ops = small_ops(qkv) if cos.shape[-1] == self.head_dim else None
        outs, start = [], 0
        for seg, m in zip(segs, masks, strict=True):
            end = start + seg.length
            if ops is not None and (seg.length == 1 or (seg.all_logits
                                                        and seg.length <= VERIFY_ROWS)):
                # decode steps and draft verification: rows one by one in our C code
                outs.append(self._attend_rows(ops, qkv[start:end], cos[start:end],
                                              sin[start:end], seg))
            else:
                outs.append(self._attend_torch(qkv[start:end], cos[start:end],
                                               sin[start:end], seg, m.get(self.window)))
            start = end
        return self.wo(outs[0] if len(outs) == 1 else torch.cat(outs))

    def _attend_rows(self, ops, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     seg: Segment) -> torch.Tensor:
        T = qkv.shape[0]
        qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
        k, v = seg.cache.k[self.layer], seg.cache.v[self.layer]  # (KV, capacity, D)
        assert k.is_contiguous() and v.is_contiguous() and k.dtype == torch.float32
        out = torch.empty(T, self.n_heads * self.head_dim)
        rc = ops.cv_attend_rows(qkv.data_ptr(), T, self.n_heads, self.n_kv, self.head_dim,
                                cos.data_ptr(), sin.data_ptr(), k.data_ptr(), v.data_ptr(),
                                k.shape[1], seg.pos, self.window or 0, self.scale,
                                out.data_ptr(), native.kernel_threads())
        if rc != 0:
            raise RuntimeError(f"attention kernel failed ({rc})")
        return out

    def _attend_torch(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      seg: Segment, mask: torch.Tensor | None) -> torch.Tensor:
        T = qkv.shape[0]
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim,
                             self.n_kv * self.head_dim], dim=-1)
        q = q.view(T, self.n_heads, self.head_dim).transpose(0, 1)  # (H, T, D)
        k = k.view(T, self.n_kv, self.head_dim).transpose(0, 1)  # (KV, T, D)
        v = v.view(T, self.n_kv, self.head_dim).transpose(0, 1)  # (KV, T, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return self._attend(q, k, v, seg, mask)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segment,
                mask: torch.Tensor | None) -> torch.Tensor:
        T = q.shape[1]
        keys, values = seg.cache.update(self.layer, seg.pos, k, v)  # (KV, L, D)
        L = keys.shape[1]
        group = self.n_heads // self.n_kv
        if T == 1:
            y = self._decode_row(q, *self._window(keys, values), group)
        elif seg.all_logits and T <= VERIFY_ROWS:
            # Verifying a draft: each row exactly as a single-token decode step would compute
            # it (same kernel, same key range), so accepted drafts leave greedy output
            # bit-for-bit unchanged.
            start = L - T
            y = torch.cat([self._decode_row(q[:, t:t + 1], *self._window(
                keys[:, :start + t + 1], values[:, :start + t + 1]), group)
                for t in range(T)], dim=1)
        else:
            y = F.scaled_dot_product_attention(
                q.unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask,
                is_causal=mask is None, scale=self.scale, enable_gqa=group > 1).squeeze(0)
        return y.transpose(0, 1).reshape(T, self.n_heads * self.head_dim)  # (T, H*D)

    def _window(self, keys: torch.Tensor, values: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys a single query at the end of `keys` sees (sliding-window layers)."""
        L = keys.shape[1]
        if self.window is not None and L > self.window:
            return keys[:, L - self.window:], values[:, L - self.window:]
        return keys, values

    def _decode_row(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    group: int) -> torch.Tensor:
        """One query position (H, 1, D) against every key given: the query heads of each
        KV group are folded into the time axis, so K and V are used as they are, never
        repeated. No mask: every key given is visible."""
        qg = q.reshape(1, self.n_kv, group, self.head_dim)  # (1, KV, G, D)
        y = F.scaled_dot_product_attention(qg, keys.unsqueeze(0), values.unsqueeze(0),
                                           scale=self.scale)
        return y.reshape(self.n_heads, 1, self.head_dim)  # (H, 1, D)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig, blocks: int) -> None:
        super().__init__()
        self.gated = cfg.mlp == "gated"
        self.act = cfg.hidden_act
        self.inter = cfg.intermediate_size
        if self.gated:
            self.w_gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, cfg.mlp_bias,
                                    blocks)
        else:
            self.w_up = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, blocks)
        self.w_down = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gu = self.w_gate_up(x)
            ops = (small_ops(gu) if self.act == "silu" and gu.dim() == 2
                   and gu.shape[0] <= KERNEL_ROWS else None)
            if ops is not None:  # a decode step: as the whole-step C code does it
                gu = gu.contiguous()
                a = torch.empty(gu.shape[0], self.inter)
                ops.cv_silu_mul(gu.data_ptr(), gu.shape[0], self.inter, a.data_ptr())
                return self.w_down(a)
            gate, up = gu.split(self.inter, dim=-1)
            return self.w_down(activation(self.act, gate) * up)
        return self.w_down(activation(self.act, self.w_up(x)))


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int, blocks: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer, blocks)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg, blocks)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                segs: list[Segment], masks: list[dict]) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, segs, masks)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: DecoderConfig, blocks: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        blocks = default_blocks() if blocks is None else blocks
        # Tied: the LM head's (hidden, vocab) matrix is the embedding table too.
        self.embed = (None if cfg.tie_word_embeddings
                      else nn.Embedding(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i, blocks) for i in range(cfg.num_layers))
        self.norm = make_norm(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, blocks)
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (that of the weights, unless they are quantized)."""
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            return self.embed(tokens)
        return self.lm_head.columns(tokens)  # (T, hidden)

    def setup_rope(self, max_positions: int | None = None) -> None:
        """Precompute cos/sin for every position (float32 math, as the reference does)."""
        cfg = self.cfg
        n = max_positions or cfg.max_position_embeddings
        device = self.device
        dim = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (
            torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        inv_freq = inv_freq / cfg.rope_scaling_factor
        positions = torch.arange(n, device=device, dtype=torch.float)
        freqs = torch.outer(positions, inv_freq)  # (n, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, D)
        dtype = self.dtype
        self.rope_cos = emb.cos().to(dtype)
        self.rope_sin = emb.sin().to(dtype)

    @property
    def max_positions(self) -> int:
        return 0 if self.rope_cos is None else self.rope_cos.shape[0]

    def _mask(self, pos: int, T: int, window: int | None, device: torch.device
              ) -> torch.Tensor | None:
        """Boolean (T, pos+T) mask, True where a query may attend; None for plain causal."""
        if pos == 0 and window is None:
            return None
        q = torch.arange(pos, pos + T, device=device).unsqueeze(1)
        k = torch.arange(pos + T, device=device).unsqueeze(0)
        allowed = k <= q
        if window is not None:
            allowed &= k > q - window
        return allowed

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, pos: int,
                all_logits: bool = False, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run `tokens` (T,) at positions pos..pos+T-1, filling `cache`; `embeds` (T, hidden),
        when given, are the input vectors instead of the tokens' embeddings (images).

        Returns logits (T, vocab) if `all_logits`, else (1, vocab) for the last position.
        """
        return self.forward_many([Segment(tokens, cache, pos, embeds, all_logits)])[0]

    def _apply(self, fn, *args, **kwargs):
        self._plan = None  # .to(), .float(), ...: the weights may move; plan again
        return super()._apply(fn, *args, **kwargs)

    def _step_plan(self):
        """The C description of this model for whole decode steps (native.CLayer per layer),
        or False where the step must run here: not a Llama / Qwen2 shape with RMSNorm and
        a gated SiLU MLP, weights neither float32 rows nor int8, or no C library."""
        plan = getattr(self, "_plan", None)
        if plan is not None:
            return plan
        self._plan = False
        cfg = self.cfg
        ops = small_ops(self.norm.weight.detach())
        if (ops is None or cfg.norm != "rms" or cfg.mlp != "gated" or cfg.hidden_act != "silu"
                or self.rope_cos is None or self.rope_cos.shape[-1] != cfg.head_dim):
            return False
        CLayer, CLinear = native.CLayer, native.CLinear

        def ptr(t: torch.Tensor | None) -> int | None:
            return None if t is None else t.data_ptr()

        def lin(m) -> CLinear | None:
            if isinstance(m, Int8Linear):
                return CLinear(m.qweight.data_ptr(), m.scale.data_ptr(), ptr(m.bias),
                               m.in_features, m.out_features)
            if isinstance(m, Linear) and m.blocks == ROWS and m.weight.dtype == torch.float32:
                return CLinear(m.weight.data_ptr(), None, ptr(m.bias), m.in_features,
                               m.out_features)
            return None

        layers = (CLayer * cfg.num_layers)()
        for i, b in enumerate(self.layers):
            parts = [lin(b.attn.wqkv), lin(b.attn.wo), lin(b.mlp.w_gate_up), lin(b.mlp.w_down)]
            if any(p is None for p in parts):
                return False
            layers[i] = CLayer(b.attn_norm.weight.data_ptr(), b.mlp_norm.weight.data_ptr(),
                               *parts, b.attn.window or 0)
        head = lin(self.lm_head)
        if head is None:
            return False
        attn = self.layers[0].attn
        # the arguments of cv_decode_rows that stay the same from step to step
        fixed = (layers, cfg.num_layers, self.norm.weight.data_ptr(), head, self.norm.eps,
                 cfg.hidden_size, attn.n_heads, attn.n_kv, attn.head_dim,
                 cfg.intermediate_size)
        self._plan = (ops, fixed, attn.scale, cfg.vocab_size)
        return self._plan

    def _step_in_c(self, seg: Segment, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> torch.Tensor | None:
        """A decode step or a draft's verification run as one C call (cv_decode_rows):
        the same operations, in the same order, as the layers below run for such rows.
        x is overwritten: the caller passes its own copy (fresh embeddings)."""
        plan = self._step_plan()
        k, v = seg.cache.k, seg.cache.v
        if (not plan or k.dtype != torch.float32 or not k.is_contiguous()
                or not v.is_contiguous()):
            return None
        ops, fixed, scale, vocab = plan
        x = x.contiguous()
        logits = torch.empty(seg.length if seg.all_logits else 1, vocab)
        cos, sin = cos.contiguous(), sin.contiguous()
        rc = ops.cv_decode_rows(*fixed, x.data_ptr(), seg.length, cos.data_ptr(),
                                sin.data_ptr(), k.data_ptr(), v.data_ptr(), k.shape[2], seg.pos,
                                scale, int(seg.all_logits), logits.data_ptr(),
                                native.kernel_threads())
        if rc != 0:
            raise RuntimeError(f"decode step in C failed ({rc})")
        return logits

    @torch.inference_mode()
    def forward_many(self, segs: list[Segment]) -> list[torch.Tensor]:
        """Several sequences in one pass (batching): each segment's tokens run at its own
        positions against its own cache; the weights are read once for all of them.
        Returns each segment's logits, as `forward` does."""
        assert self.rope_cos is not None and self.rope_sin is not None, "call setup_rope()"
        xs, cos, sin = [], [], []
        for seg in segs:
            T = seg.length
            xs.append(self.embed_tokens(seg.tokens) if seg.embeds is None
                      else seg.embeds.to(self.dtype))
            cos.append(self.rope_cos[seg.pos:seg.pos + T])  # (T, D), broadcasts over heads
            sin.append(self.rope_sin[seg.pos:seg.pos + T])
        if len(segs) == 1:
            x, c, s = xs[0], cos[0], sin[0]
            seg = segs[0]
            if (seg.length <= KERNEL_ROWS and (seg.length == 1 or seg.all_logits)
                    and x.dtype == torch.float32 and x.device.type == "cpu"):
                # a step or a draft: one C call, which overwrites its input (the caller's
                # embeddings of an image must not change: a copy)
                out = self._step_in_c(seg, x if seg.embeds is None else x.clone(), c, s)
                if out is not None:
                    return [out]
        else:
            x, c, s = torch.cat(xs), torch.cat(cos), torch.cat(sin)
        windows = {layer.attn.window for layer in self.layers}  # type: ignore[union-attr]
        masks = [{w: self._mask(seg.pos, seg.length, w, x.device) for w in windows}
                 if seg.length > 1 else {} for seg in segs]
        for layer in self.layers:
            x = layer(x, c, s, segs, masks)
        rows, start = [], 0
        for seg in segs:
            end = start + seg.length
            rows.append(torch.arange(start, end) if seg.all_logits
                        else torch.tensor([end - 1]))
            start = end
        picked = x[torch.cat(rows)] if len(segs) > 1 or not segs[0].all_logits else x
        logits = self.lm_head(self.norm(picked)).float()
        return list(logits.split([len(r) for r in rows]))


class Segment:
    """One sequence's share of a batched forward pass."""

    __slots__ = ("tokens", "cache", "pos", "embeds", "all_logits", "length")

    def __init__(self, tokens: torch.Tensor, cache: KVCache, pos: int,
                 embeds: torch.Tensor | None = None, all_logits: bool = False) -> None:
        self.tokens, self.cache, self.pos = tokens, cache, pos
        self.embeds, self.all_logits = embeds, all_logits
        self.length = int(tokens.shape[0])
