"""Engine invariants: prefix cache, eviction, streaming, stops, cancellation, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch
from codevista.models.engine import Engine, SamplingParams
from codevista.models.errors import ContextLengthError, RequestError
from tiny_models import VOCAB


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n,), generator=g).tolist()


def test_prefix_hit_gives_same_tokens_as_cold_run_and_reports_reuse(loaded_qwen):
    prompt = _ids(100, seed=10)
    longer = prompt + _ids(5, seed=11)
    greedy = SamplingParams(max_new_tokens=24, ignore_eos=True)
    with Engine(loaded_qwen) as cold:
        cold_result = cold.generate(longer, greedy)
    assert cold_result.cached_tokens == 0
    with Engine(loaded_qwen) as warm:
        first = warm.generate(prompt, greedy)
        assert first.cached_tokens == 0
        again = warm.generate(longer, greedy)
        same = warm.generate(longer, greedy)
    assert again.cached_tokens == len(prompt)  # the first prompt's K/V were reused
    assert same.cached_tokens == len(longer) - 1  # all but the last token
    assert again.token_ids == cold_result.token_ids
    assert same.token_ids == cold_result.token_ids


def test_one_appended_token_recomputes_only_the_new_tokens(engine):
    prompt = _ids(300, seed=12)
    engine.generate(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))
    for _ in range(3):
        prompt = prompt + [7]
        r = engine.generate(prompt, SamplingParams(max_new_tokens=2, ignore_eos=True))
        assert r.cached_tokens == len(prompt) - 1


def test_eviction_keeps_cache_under_budget(loaded_qwen):
    per_token = loaded_qwen.config.kv_bytes_per_token(4)
    budget = per_token * 256 * 2  # room for two 256-token slots
    with Engine(loaded_qwen, cache_bytes=budget) as eng:
        for seed in range(6):
            eng.generate(_ids(120, seed=100 + seed), SamplingParams(max_new_tokens=8))
            stats = eng.stats()
            assert stats.cache_bytes <= budget
        assert stats.evictions >= 4
        assert stats.busy_slots == 0 and stats.running == 0
        # A prompt evicted long ago is cold again; the most recent one is still cached.
        assert eng.generate(_ids(120, seed=100), SamplingParams(max_new_tokens=2)
                            ).cached_tokens == 0
        assert eng.generate(_ids(120, seed=105), SamplingParams(max_new_tokens=2)
                            ).cached_tokens == 119


def test_too_long_request_is_a_clear_error(loaded_qwen):
    per_token = loaded_qwen.config.kv_bytes_per_token(4)
    with Engine(loaded_qwen, cache_bytes=per_token * 256) as eng:
        with pytest.raises(ContextLengthError):
            eng.submit(_ids(200, seed=1), SamplingParams(max_new_tokens=100))
        assert eng.generate(_ids(10, seed=1), SamplingParams(max_new_tokens=3)).text is not None


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                 dict(top_p=0.0), dict(top_k=-2)])
def test_bad_sampling_params_raise(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_bad_prompt_ids_raise(engine):
    with pytest.raises(RequestError):
        engine.submit([VOCAB + 5])
    with pytest.raises(RequestError):
        engine.submit("")


def test_streamed_deltas_join_to_result_and_full_decode(engine, loaded_qwen):
    for seed in range(5):
        params = SamplingParams(max_new_tokens=60, temperature=1.5, seed=seed,
                                ignore_eos=True)
        handle = engine.submit(_ids(20, seed=seed), params)
        deltas = list(handle)
        result = handle.result()
        assert "".join(deltas) == result.text
        assert result.text == loaded_qwen.tokenizer.decode(result.token_ids)


def test_sampling_is_seeded_and_greedy_is_deterministic(engine):
    prompt = _ids(30, seed=3)
    a = engine.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0.8, seed=1,
                                               top_k=50, top_p=0.9))
    b = engine.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0.8, seed=1,
                                               top_k=50, top_p=0.9))
    assert a.token_ids == b.token_ids
    g1 = engine.generate(prompt, SamplingParams(max_new_tokens=20))
    g2 = engine.generate(prompt, SamplingParams(max_new_tokens=20))
    assert g1.token_ids == g2.token_ids


def test_stop_string_truncates_text_and_stream(engine):
    prompt = _ids(30, seed=5)
    base = engine.generate(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True))
    text = base.text
    assert len(text) > 12
    stop = text[8:12]
    cut = text.find(stop)
    handle = engine.submit(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True,
                                                  stop=(stop,)))
    streamed = "".join(handle)
    result = handle.result()
    assert result.finish_reason == "stop"
    assert result.text == streamed == text[:cut]


def test_stop_token_ends_generation_before_it(engine):
    prompt = _ids(30, seed=6)
    base = engine.generate(prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
    stop_id = base.token_ids[5]
    first = base.token_ids.index(stop_id)
    r = engine.generate(prompt, SamplingParams(max_new_tokens=20, stop_token_ids=(stop_id,)))
    assert r.finish_reason == "stop"
    assert r.token_ids == base.token_ids[:first]


def test_cancel_stops_within_one_step_and_frees_the_slot(engine):
    handle = engine.submit(_ids(10, seed=7), SamplingParams(max_new_tokens=3000,
                                                            ignore_eos=True))
    while handle.tokens_generated < 5:
        time.sleep(0.001)
    seen = handle.tokens_generated
    handle.cancel()
    result = handle.result(timeout=10)
    assert result.finish_reason == "cancelled"
    # one more turn at most: a token, or a verified prompt-lookup draft (<= 8) and a token
    assert result.generated_tokens <= seen + 9
    stats = engine.stats()
    assert stats.running == 0 and stats.busy_slots == 0
    # The engine carries on: the next request works.
    assert engine.generate(_ids(10, seed=8), SamplingParams(max_new_tokens=5,
                                                            ignore_eos=True)
                           ).finish_reason == "length"


def test_cancel_before_admission(engine):
    blocker = engine.submit(_ids(10, seed=9), SamplingParams(max_new_tokens=2000,
                                                             ignore_eos=True))
    h = engine.submit(_ids(10, seed=10), SamplingParams(max_new_tokens=2000))
    h.cancel()
    blocker.cancel()
    assert h.result(timeout=10).finish_reason == "cancelled"
    assert blocker.result(timeout=10).finish_reason == "cancelled"


def test_deadline_ends_the_request(engine):
    r = engine.generate(_ids(10, seed=11), SamplingParams(max_new_tokens=3000,
                                                          ignore_eos=True, deadline_s=0.05))
    assert r.finish_reason == "deadline"
    assert 0 < r.generated_tokens < 3000


def test_short_request_is_not_stuck_behind_a_long_one(engine):
    long = engine.submit(_ids(10, seed=12), SamplingParams(max_new_tokens=3000,
                                                           ignore_eos=True))
    while long.tokens_generated < 3:
        time.sleep(0.001)
    short = engine.generate(_ids(12, seed=13), SamplingParams(max_new_tokens=5,
                                                              ignore_eos=True))
    assert short.finish_reason == "length"
    assert not long.done  # the short one finished while the long one was running
    long.cancel()
    assert long.result(timeout=10).finish_reason == "cancelled"


def test_concurrent_requests_sharing_a_prefix_match_sequential(loaded_qwen):
    prompt = _ids(200, seed=14)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    with Engine(loaded_qwen) as eng:
        expected = eng.generate(prompt + [5], params).token_ids
        eng.cache.clear()
        handles = [eng.submit(prompt + [5], params) for _ in range(3)]
        results = [h.result(timeout=30) for h in handles]
    assert all(r.token_ids == expected for r in results)


async def test_async_stream_does_not_block_the_loop(engine):
    handle = engine.submit(_ids(10, seed=15), SamplingParams(max_new_tokens=200,
                                                             ignore_eos=True))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not handle.done:
            ticks += 1
            await asyncio.sleep(0)

    tick_task = asyncio.create_task(ticker())
    deltas = [d async for d in handle.astream()]
    await tick_task
    result = await handle.aresult()
    assert "".join(deltas) == result.text
    assert result.generated_tokens == 200
    assert ticks > 0


def test_submit_from_many_threads(engine):
    results = []

    def worker(seed: int) -> None:
        results.append(engine.generate(_ids(15, seed=seed), SamplingParams(max_new_tokens=6,
                                                                           ignore_eos=True)))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 6 and all(r.generated_tokens == 6 for r in results)


def test_required_prefix_forces_the_start_of_the_output(engine, loaded_qwen):
    tok = loaded_qwen.tokenizer
    for required in ("return", "    sel", "x"):
        r = engine.generate(tok.encode("def f(a, b):\n"),
                            SamplingParams(max_new_tokens=12, required_prefix=required))
        assert r.text.startswith(required), (required, r.text)


async def test_result_after_leaving_the_stream_early(engine):
    """Breaking out of astream() and then awaiting aresult() must not hang."""
    handle = engine.submit(_ids(10, seed=16), SamplingParams(max_new_tokens=500,
                                                             ignore_eos=True))
    seen = 0
    async for _ in handle.astream():
        seen += 1
        if seen == 5:
            handle.cancel()
            break
    result = await asyncio.wait_for(handle.aresult(), 10)
    assert result.finish_reason == "cancelled"


def test_ngram_index_drafts_what_followed_the_latest_occurrence():
    from codevista.models.engine.lookup import NgramIndex

    idx = NgramIndex([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    assert idx.draft(2) == [4, 5]  # the longest n-gram that recurs wins: (1, 2, 3)
    assert NgramIndex([2, 3, 7, 8, 1, 2, 3]).draft(2) == [7, 8]  # else (2, 3)
    idx = NgramIndex([5, 1, 2, 3, 4, 6, 1, 2, 3])
    assert idx.draft(3) == [4, 6, 1]  # the 3-gram (1, 2, 3) first
    assert NgramIndex([1, 2, 3]).draft(4) == []  # nothing repeats
    assert idx.draft(0) == []
    idx.append(4)
    assert idx.draft(2) == [6, 1]
    # Image positions of a vision prompt (negative ids) are never drafted: a description
    # that repeats the text just before the image must not propose the image itself.
    img = NgramIndex([7, 1, 2, 3, -2, -2, -2, 9, 1, 2, 3])
    assert img.draft(4) == []
    img = NgramIndex([1, 2, 3, 8, -2, -2, 9, 1, 2, 3])
    assert img.draft(4) == [8]


def test_ngram_index_built_at_once_equals_one_token_at_a_time():
    """A prompt's index is built in bulk (fast); it must hold what appending each token
    would, whatever the split between the two."""
    import random

    from codevista.models.engine.lookup import NgramIndex

    rng = random.Random(1)
    for _ in range(300):
        toks = [rng.randrange(4) for _ in range(rng.randrange(0, 30))]
        cut = rng.randrange(0, len(toks) + 1)
        one = NgramIndex(sizes=(3, 2))
        for t in toks:
            one.append(t)
        bulk = NgramIndex(toks[:cut], sizes=(3, 2))
        bulk.extend(toks[cut:])
        assert bulk.seen == one.seen and bulk.tokens == one.tokens
        assert bulk.draft(3) == one.draft(3)


def _repetitive_prompt(n: int) -> list[int]:
    line = _ids(12, seed=40)
    out: list[int] = []
    for i in range(n):
        out += line[:6] + [4 + i % 7] + line[6:]
    return out


@pytest.mark.parametrize("max_new", [1, 5, 40])
def test_prompt_lookup_output_equals_plain_greedy(loaded_qwen, max_new):
    prompt = _repetitive_prompt(8)
    greedy = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    with Engine(loaded_qwen, lookup=False) as plain:
        expected = plain.generate(prompt, greedy)
    with Engine(loaded_qwen, lookup=True) as fast:
        got = fast.generate(prompt, greedy)
        again = fast.generate(prompt + expected.token_ids[:3], greedy)
        stats = fast.stats()
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert len(got.token_ids) == max_new
    with Engine(loaded_qwen, lookup=False) as plain:
        assert again.token_ids == plain.generate(prompt + expected.token_ids[:3],
                                                 greedy).token_ids
    if max_new > 1:
        assert stats.drafted > 0  # the repeated lines gave drafts to verify


def test_prompt_lookup_on_the_embedded_model_accepts_drafts_with_identical_text():
    from codevista.models.loader import DEFAULT_MODEL_DIR, load_model

    loaded = load_model(DEFAULT_MODEL_DIR)
    # (ends indented, as an editor leaves a new line in a function body)
    prompt = ("<|lang:python|>def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n"
              "    return a - b\n\n\ndef mul(a, b):\n    ")
    params = SamplingParams(max_new_tokens=80, stop=("\ndef div",))
    with Engine(loaded, lookup=False) as plain:
        expected = plain.generate(prompt, params)
    with Engine(loaded, lookup=True) as fast:
        got = fast.generate(prompt, params)
        stats = fast.stats()
    assert got.text == expected.text and got.finish_reason == expected.finish_reason
    assert stats.accepted > 0, stats


def test_prompt_lookup_stays_out_of_sampled_and_healed_requests(loaded_qwen):
    prompt = _repetitive_prompt(6)
    with Engine(loaded_qwen, lookup=True) as e:
        e.generate(prompt, SamplingParams(max_new_tokens=20, temperature=0.8, seed=1))
        assert e.stats().drafted == 0


def test_concurrent_requests_are_batched_and_each_equals_its_solo_run(loaded_qwen):
    prompts = [_ids(40 + 7 * i, seed=60 + i) for i in range(4)]
    params = [SamplingParams(max_new_tokens=12 + 5 * i, ignore_eos=True) for i in range(4)]
    with Engine(loaded_qwen, lookup=False) as solo:
        expected = [solo.generate(p, sp).token_ids for p, sp in zip(prompts, params,
                                                                     strict=True)]
    with Engine(loaded_qwen, lookup=False) as e:
        handles = [e.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        got = [h.result(60).token_ids for h in handles]
        stats = e.stats()
    assert got == expected
    assert stats.batched_turns > 0 and stats.turns < sum(len(x) for x in expected)


def test_a_failing_request_does_not_take_its_batch_down(loaded_qwen, monkeypatch):
    poison = 3  # _ids() never draws it
    real = loaded_qwen.model.forward_many

    def fragile(segs):
        if any(bool((seg.tokens == poison).any()) for seg in segs):
            raise RuntimeError("poisoned sequence")
        return real(segs)

    monkeypatch.setattr(loaded_qwen.model, "forward_many", fragile)
    with Engine(loaded_qwen, lookup=False) as e:
        good = e.submit(_ids(30, seed=70), SamplingParams(max_new_tokens=20, ignore_eos=True))
        bad = e.submit(_ids(29, seed=71) + [poison],
                       SamplingParams(max_new_tokens=20, ignore_eos=True))
        r_good, r_bad = good.result(60), bad.result(60)
        again = e.generate(_ids(30, seed=70), SamplingParams(max_new_tokens=20,
                                                             ignore_eos=True))
    assert r_good.finish_reason == "length" and len(r_good.token_ids) == 20
    assert r_bad.finish_reason == "error" and "poisoned" in str(r_bad.error)
    assert again.token_ids == r_good.token_ids


def _full_logits(loaded, ids: list[int]) -> torch.Tensor:
    """The last position's logits of `ids`, computed from scratch (no cache reuse)."""
    from codevista.models.kv_cache import KVCache

    cfg = loaded.config
    cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(ids), torch.float32,
                    loaded.model.device)
    with torch.inference_mode():
        return loaded.model(torch.tensor(ids), cache, 0)[-1].float()


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_classifier_free_guidance_samples_from_the_mixed_logits(loaded_qwen, scale):
    prompt, guide = _ids(20, seed=80), _ids(9, seed=81)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, guidance_prompt=tuple(guide),
                            guidance_scale=scale, token_range=(4, 40))
    expected: list[int] = []
    for _ in range(params.max_new_tokens):  # the definition, step by step, uncached
        c = _full_logits(loaded_qwen, prompt + expected)
        u = _full_logits(loaded_qwen, guide + expected)
        mixed = u + scale * (c - u)
        expected.append(4 + int(mixed[4:40].argmax()))
    with Engine(loaded_qwen) as e:
        other = e.submit(_ids(30, seed=82), SamplingParams(max_new_tokens=15, ignore_eos=True))
        got = e.generate(prompt, params)
        other.result(60)
        stats = e.stats()
        again = e.generate(prompt, params)  # both sequences' prefixes now cached
    assert got.token_ids == expected
    assert again.token_ids == expected and again.cached_tokens == len(prompt) - 1
    assert stats.busy_slots == 0 and stats.running == 0
    if scale != 1.0:  # guidance changes the choice somewhere on random weights
        plain = [4 + int(_full_logits(loaded_qwen, prompt + expected[:i])[4:40].argmax())
                 for i in range(len(expected))]
        assert plain != expected


def test_guidance_parameters_are_checked(loaded_qwen):
    with pytest.raises(RequestError):
        SamplingParams(guidance_prompt=(), guidance_scale=2.0)
    with pytest.raises(RequestError):
        SamplingParams(guidance_prompt=(1, 2), guidance_scale=0.0)
    with Engine(loaded_qwen) as e, pytest.raises(RequestError):
        e.submit([5, 6], SamplingParams(guidance_prompt=(VOCAB + 5,), guidance_scale=2.0))


def test_logit_bias_is_added_before_the_greedy_choice(loaded_qwen):
    prompt = _ids(24, seed=90)
    first = _full_logits(loaded_qwen, prompt)
    top2 = first.topk(2)
    # enough for the runner-up to win the first step; and one token ruled out
    favoured = {int(top2.indices[1]): float(top2.values[0] - top2.values[1]) + 0.5,
                13: -50.0}
    params = SamplingParams(max_new_tokens=12, ignore_eos=True,
                            logit_bias=tuple(favoured.items()))
    expected: list[int] = []
    for _ in range(params.max_new_tokens):  # the definition, step by step, uncached
        row = _full_logits(loaded_qwen, prompt + expected).clone()
        for t, b in favoured.items():
            row[t] += b
        expected.append(int(row.argmax()))
    plain: list[int] = []
    for _ in range(params.max_new_tokens):
        plain.append(int(_full_logits(loaded_qwen, prompt + plain).argmax()))
    with Engine(loaded_qwen) as e:
        got = e.generate(prompt, params)
        # a repetitive prompt would be drafted by prompt lookup; with a bias it is not
        # (drafts are verified against the unbiased argmax)
        again = e.generate(prompt * 3, params)
        assert e.stats().drafted == 0
    assert got.token_ids == expected and 13 not in got.token_ids
    assert expected != plain  # the bias changed the choice on random weights
    assert again.finish_reason == "length"


def test_logit_bias_is_checked():
    for bad in [((-1, 1.0),), ((3, 101.0),), ((3,),), (("a", 1.0),)]:
        with pytest.raises(RequestError):
            SamplingParams(logit_bias=bad)


def test_draft_policy_drafts_only_where_verification_pays():
    from codevista.models.engine.lookup import DraftPolicy

    fresh = DraftPolicy()
    assert fresh.limit(6) == 2  # nothing measured: a short draft measures the costs
    # a memory-bound step (verified rows cost 5 % of it): drafts pay at a low acceptance,
    # and then run to the caller's cap
    cheap = DraftPolicy(prior=0.3)
    cheap.record_turn(1, 2e-3)
    cheap.record_turn(5, 2.4e-3)
    assert cheap.row == pytest.approx(1e-4)
    assert cheap.limit(6) == 6 and cheap.limit(0) == 0
    # an arithmetic-bound step (a row costs half of it): only near-certain drafts pay
    dear = DraftPolicy(prior=0.95)
    dear.record_turn(1, 4e-4)
    dear.record_turn(3, 8e-4)
    assert dear.limit(4) == 4
    dear.acceptance = 0.4
    answers = [dear.limit(4) for _ in range(64)]
    # refused, but one refusal in PROBE drafts a single token to keep the costs current
    assert answers.count(1) == 64 // DraftPolicy.PROBE and set(answers) == {0, 1}


def test_draft_policy_averages_are_robust():
    from codevista.models.engine.lookup import DraftPolicy

    pol = DraftPolicy()
    pol.record_turn(1, 1e-3)
    pol.record_turn(1, 1.0)  # a turn the OS interrupted counts as at most twice a step
    assert pol.step == pytest.approx(0.8 * 1e-3 + 0.2 * 2e-3)
    pol.record_turn(3, 1.0)
    pol.record_turn(3, 1.0)  # per row at most twice the average so far (+ a tenth of a step)
    assert pol.row < 1.0
    # acceptance: each right draft token and the first wrong one are trials
    pol.judged(4, 3)  # 3 of 4 trials right
    assert pol.acceptance == pytest.approx(0.95 * 0.5 + 0.05 * 0.75)
    before = pol.acceptance
    pol.judged(0, 0)
    assert pol.acceptance == before
