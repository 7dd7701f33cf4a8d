"""Logit and greedy-token parity with the `transformers` implementation of each family."""

from __future__ import annotations

import pytest
import torch
from codevista.models.engine import Engine, SamplingParams
from codevista.models.kv_cache import KVCache
from codevista.models.loader import load_model
from tiny_models import FAMILIES, VOCAB, load_reference


def _prompt(n: int = 64, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n,), generator=g).tolist()


def _cache(loaded, capacity: int = 256) -> KVCache:
    c = loaded.config
    return KVCache(c.num_layers, c.num_kv_heads, c.head_dim, capacity, torch.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers(family, checkpoints):
    path = checkpoints[family]
    ours = load_model(path)
    ref = load_reference(path)
    ids = _prompt()
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    got = ours.model(torch.tensor(ids), _cache(ours), 0, all_logits=True)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_chunked_prefill_matches_one_pass(family, checkpoints):
    """Prefill in chunks over a cached prefix (explicit masks, windows) == one pass."""
    ours = load_model(checkpoints[family])
    ids = torch.tensor(_prompt(64, seed=2))
    full = ours.model(ids, _cache(ours), 0, all_logits=True)
    cache = _cache(ours)
    parts = [ours.model(ids[a:b], cache, a, all_logits=True)
             for a, b in ((0, 20), (20, 41), (41, 64))]
    assert (torch.cat(parts) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_decode_equals_full_forward(family, checkpoints):
    ours = load_model(checkpoints[family])
    ids = torch.tensor(_prompt(48, seed=3))
    full = ours.model(ids, _cache(ours), 0, all_logits=True)
    cache = _cache(ours)
    ours.model(ids[:16], cache, 0)
    steps = [ours.model(ids[i:i + 1], cache, i) for i in range(16, 48)]
    assert (torch.cat(steps) - full[16:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_tokens_match_transformers_generate(family, checkpoints):
    path = checkpoints[family]
    ref = load_reference(path)
    ids = _prompt(64, seed=4)
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32,
                           min_new_tokens=32, pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    with Engine(load_model(path)) as engine:
        result = engine.generate(ids, SamplingParams(max_new_tokens=32, ignore_eos=True))
    assert result.token_ids == expected
    assert result.finish_reason == "length"
