"""The decode step's small operations in C (models/kernels/ops.c) against the torch code
they replace: RMSNorm, and attention with rotary embeddings, the cache write, GQA and
sliding windows, for one row and for the rows of a draft being verified."""

from __future__ import annotations

import math

import pytest
import torch
from codevista.models.config import DecoderConfig
from codevista.models.kv_cache import KVCache
from codevista.models.transformer import ROWS, Attention, RMSNorm, Segment, small_ops


@pytest.fixture(scope="module")
def ops():
    with torch.inference_mode():
        lib = small_ops(torch.zeros(1))
    if lib is None:
        pytest.skip("our C library does not build here")
    return lib


def _rope(positions: int, dim: int, theta: float = 10000.0):
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    f = torch.outer(torch.arange(positions).float(), inv)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def test_rmsnorm_in_c_equals_torch(ops):
    norm = RMSNorm(96, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(96))
    x = torch.randn(5, 96) * 3
    ref = norm(x)  # gradients on: the torch code
    with torch.inference_mode():
        got = norm(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the training recipe's (batch, time, hidden) inputs under no_grad: torch code, right
    x3 = torch.randn(4, 30, 96)
    ref3 = norm(x3)
    with torch.no_grad():
        torch.testing.assert_close(norm(x3), ref3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2)])
@pytest.mark.parametrize("D", [16, 32, 64, 128])  # the kernel's head sizes: 1, 2, 4, 8 vectors
def test_attention_rows_in_c_equal_torch(ops, window, heads, D):
    """A decode step and a verified draft of 6 rows, at positions past the window, give
    the torch path's output and cache; the draft's rows equal one-row steps bit for bit
    (queries sharing a KV head are taken several at a time)."""
    n_heads, n_kv = heads
    prompt = 20
    cfg = DecoderConfig(family="llama", vocab_size=50, hidden_size=n_heads * D,
                        intermediate_size=32, max_position_embeddings=64, num_layers=1,
                        num_heads=n_heads,
                        num_kv_heads=n_kv, head_dim=D, layer_windows=(window,))
    attn = Attention(cfg, 0, blocks=ROWS)  # projections in our row-independent kernel too
    g = torch.Generator().manual_seed(n_heads + (window or 0))
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    cos, sin = _rope(64, D)
    x_prompt = torch.randn(prompt, cfg.hidden_size, generator=g)
    draft = torch.randn(6, cfg.hidden_size, generator=g)

    def cache_after_prompt() -> KVCache:
        c = KVCache(1, n_kv, D, 40, torch.float32)
        with torch.no_grad():  # gradients on: torch code fills the prompt's keys
            attn(x_prompt, cos[:prompt], sin[:prompt],
                 [Segment(torch.zeros(prompt, dtype=torch.long), c, 0)], [{}])
        return c

    def run(c: KVCache, rows: torch.Tensor, pos: int, fast: bool) -> torch.Tensor:
        seg = Segment(torch.zeros(len(rows), dtype=torch.long), c, pos, all_logits=True)
        ctx = torch.inference_mode() if fast else torch.no_grad()
        with ctx:
            return attn(rows, cos[pos:pos + len(rows)], sin[pos:pos + len(rows)], [seg], [{}])

    c_ref, c_fast = cache_after_prompt(), cache_after_prompt()
    ref, fast = run(c_ref, draft, prompt, False), run(c_fast, draft, prompt, True)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    end = prompt + len(draft)
    torch.testing.assert_close(c_fast.k[:, :, :end], c_ref.k[:, :, :end])
    torch.testing.assert_close(c_fast.v[:, :, :end], c_ref.v[:, :, :end])
    # the same rows as decode steps, one at a time: identical bits
    c_steps = cache_after_prompt()
    steps = torch.cat([run(c_steps, draft[i:i + 1], prompt + i, True) for i in range(6)])
    assert torch.equal(steps, fast)


def test_attention_in_c_refuses_a_position_past_the_cache(ops):
    cfg = DecoderConfig(family="llama", vocab_size=50, hidden_size=32, intermediate_size=32,
                        max_position_embeddings=64,
                        num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16)
    attn = Attention(cfg, 0, blocks=1)
    cos, sin = _rope(64, 16)
    c = KVCache(1, 2, 16, 4, torch.float32)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="attention kernel"):
        attn(torch.randn(1, 32), cos[4:5], sin[4:5],
             [Segment(torch.zeros(1, dtype=torch.long), c, 4)], [{}])


@pytest.mark.parametrize("name", ["qwen2", "qwen2_window", "llama", "llama_bias"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_whole_decode_step_in_c_equals_the_layer_by_layer_forward(ops, checkpoints, name,
                                                                    dtype):
    """One C call per decode step (cv_decode_rows) gives the logits and the cache the
    layer-by-layer forward gives, bit for bit, for a step and for a verified draft; models
    it cannot run (LayerNorm, GELU) take the layer-by-layer path."""
    from codevista.models.loader import load_model

    loaded = load_model(checkpoints[name], dtype=dtype)
    m, cfg = loaded.model, loaded.config
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, cfg.vocab_size, (40,), generator=g)
    draft = torch.randint(4, cfg.vocab_size, (6,), generator=g)
    results = []
    for whole in (True, False):
        m._plan = None if whole else False  # None: built on first use; False: never
        with torch.inference_mode():
            cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 60, torch.float32)
            m(ids, cache, 0)
            step = m(ids[-1:], cache, 40)
            verified = m.forward_many([Segment(draft, cache, 41, all_logits=True)])[0]
        results.append((step, verified, cache.k[:, :, :47].clone(), cache.v[:, :, :47].clone()))
        if whole:
            assert m._plan, "the C step should serve this model"
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_models_the_c_step_cannot_run_keep_the_layer_by_layer_path(ops, checkpoints):
    from codevista.models.loader import load_model

    loaded = load_model(checkpoints["starcoder2"])  # LayerNorm, GELU MLP
    with torch.inference_mode():
        cfg = loaded.config
        cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 10, torch.float32)
        loaded.model(torch.tensor([5, 6, 7]), cache, 0)
        loaded.model(torch.tensor([8]), cache, 3)
    assert loaded.model._plan is False
