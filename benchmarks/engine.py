"""Engine speed, side by side with `transformers`, on the same weights in one run.

    python benchmarks/engine.py                 # random weights, exact Qwen2.5-Coder-0.5B shape
    python benchmarks/engine.py --model DIR     # any checkpoint directory
    python benchmarks/engine.py --quick         # tiny shape: checks the harness in seconds
    python benchmarks/engine.py --llamacpp f32,q8_0   # also llama.cpp on GGUF exports
    python benchmarks/engine.py --dtypes float32,int8 # codevista variants (default both)
    python benchmarks/engine.py --interleaved 7 --llamacpp f32,q8_0   # decode only, see below

--interleaved N loads every engine at once, each in its own process, and alternates short
decode bursts between them N times (median tokens/s each): on a shared machine whose load
changes by the minute, engines measured one after another are not measured under the same
load; alternating bursts are. (Until 2026-11-29 they shared one process, which slowed
llama.cpp: see interleaved().)

With --llamacpp (needs llama-cpp-python), the same weights are exported by
`codevista export-gguf` in each listed type and run by llama.cpp in the same run. The
machine's memory bandwidth (a 512 MiB copy, and a multi-threaded 1 GiB read) and float32
matmul throughput are measured too, and each engine's decode speed is printed as a
percentage of the bandwidth limit (the higher bandwidth / bytes of weights read per token;
a model small enough to stay in the CPU caches can exceed it).

Each engine runs in its own subprocess (so peak RSS is its own) and prints JSON lines;
this process prints them, then one line of ratios. Measured:
  prefill_tps_<N>   prompt tokens per second for a cold N-token prompt (first token out)
  ttft_cold_s       time to first token, cold, for the longest prompt
  ttft_append_s     time to first token after appending one token to that cached prompt
  decode_tps        tokens per second while decoding (after the first token)
  peak_rss_mb       the process's peak resident memory
  int8 accuracy     logit error and greedy agreement of int8 weights against float32
  lookup_speedup    (checkpoints with a tokenizer) greedy decode with prompt-lookup
                    speculative decoding over plain greedy decode, for the completions the
                    server would ask for (its prompts and stop tokens) at cursors in
                    repetitive real code (the standard library's http/__init__.py,
                    token.py and unittest/case.py); outputs must be identical;
                    lookup_*_end: the same files cut after the typed line (the cursor at
                    the end of a file being written); --lookup-only runs just these
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"

# Published config of Qwen2.5-Coder-0.5B (see shared MODELS.md).
QWEN_05B = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                max_position_embeddings=32768, rope_parameters={"rope_type": "default",
                                                               "rope_theta": 1e6},
                rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                eos_token_id=151643)
TINY = dict(QWEN_05B, vocab_size=4096, hidden_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=256,
            max_position_embeddings=4096, bos_token_id=0, eos_token_id=0)


def make_random_checkpoint(out: Path, shape: dict) -> Path:
    """Random weights with `shape`, saved by transformers in the HF layout, + a tokenizer."""
    if (out / "config.json").is_file():
        return out
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [p.read_text(errors="ignore") for p in sorted((ROOT / "models").rglob("*.py"))]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(out / "tokenizer.json"))
    return out


def _prompt(n: int, vocab: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(10, min(vocab, 150000), (n,), generator=g).tolist()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_codevista(model_dir: Path, lengths: list[int], decode_tokens: int,
                     dtype: str) -> dict:
    from codevista.models.engine import Engine, SamplingParams
    from codevista.models.loader import load_model

    t0 = time.perf_counter()
    loaded = load_model(model_dir, dtype=dtype)
    out: dict = {"engine": f"codevista-{dtype}", "load_s": round(time.perf_counter() - t0, 2)}
    vocab = loaded.config.vocab_size
    one = SamplingParams(max_new_tokens=1, ignore_eos=True)
    with Engine(loaded, cache_bytes=8 << 30, warmup=True) as engine:
        engine.generate(_prompt(16, vocab), one)
        for n in lengths:
            engine.cache.clear()
            r = engine.generate(_prompt(n, vocab), one)
            assert r.cached_tokens == 0
            out[f"prefill_tps_{n}"] = round(n / r.ttft_s, 2)
        longest = _prompt(lengths[-1], vocab)
        out["ttft_cold_s"] = round(lengths[-1] / out[f"prefill_tps_{lengths[-1]}"], 3)
        times = []
        for extra in range(3):  # the cached prompt grows by one token each time
            r = engine.generate(longest + [11 + i for i in range(extra + 1)], one)
            assert r.cached_tokens == len(longest) + extra
            times.append(r.ttft_s)
        out["ttft_append_s"] = round(statistics.median(times), 4)
        engine.cache.clear()
        engine.lookup = False  # plain decoding; prompt lookup is measured on its own below
        r = engine.generate(_prompt(64, vocab), SamplingParams(max_new_tokens=decode_tokens + 1,
                                                               ignore_eos=True))
        out["decode_tps"] = round(decode_tokens / (r.total_s - r.ttft_s), 2)
        if (model_dir / "tokenizer.json").is_file():
            out.update(lookup_speed(engine, decode_tokens))
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def worker_lookup(model_dir: Path, decode_tokens: int, dtype: str) -> dict:
    from codevista.models.engine import Engine
    from codevista.models.loader import load_model

    loaded = load_model(model_dir, dtype=dtype)
    with Engine(loaded, cache_bytes=8 << 30, warmup=True) as engine:
        return {"engine": f"codevista-{dtype}", "model": model_dir.name,
                **lookup_speed(engine, decode_tokens)}


REPETITIVE = ("http/__init__.py", "token.py", "unittest/case.py")


def lookup_prompts(tok, max_tokens: int, cuts: int = 4, at_end: bool = False
                   ) -> list[list[int]]:
    """The prompts the server builds (codevista.server.prompts: the FIM template of the
    model's family with the rest of the file as the suffix, or the prefix alone for a
    model without FIM tokens) for a cursor spread through repetitive standard-library
    files, within `max_tokens`: as if the line there were being typed anew, its text after
    the indentation and three more characters is removed and the cursor put there (at a
    bare line start between two existing lines, a model that knows code rightly inserts
    nothing). `at_end`: the file is being written, so nothing follows that line (the
    cursor is at the end of the document, and a completion may run on for lines)."""
    import sysconfig

    from codevista.server.documents import Snapshot
    from codevista.server.prompts import build_prompt, detect_family

    lib = Path(sysconfig.get_paths()["stdlib"])
    family = detect_family(tok)
    prompts = []
    for name in REPETITIVE:
        text = (lib / name).read_text(encoding="utf-8")
        lines = text.split("\n")
        for k in range(1, cuts + 1):
            n = len(lines) * k // (cuts + 1)
            while n < len(lines) - 1 and len(lines[n].strip()) < 8:
                n += 1  # a line with something to type
            line = lines[n]
            keep = line[:len(line) - len(line.lstrip()) + 3]
            typed = "\n".join(lines[:n] + [keep] + ([] if at_end else lines[n + 1:]))
            offset = len("\n".join(lines[:n]) + "\n") + len(keep)
            snap = Snapshot(f"file:///{name}", 1, typed, "python", offset)
            prompts.append(build_prompt(family, tok, snap, max_tokens, heal_tokens=False).ids)
    return prompts


def completion_stops(tok) -> list[int]:
    """The tokens the server stops a completion at for this tokenizer's family ([] for a
    model without FIM tokens, whose completions run to the token limit)."""
    from codevista.server.prompts import detect_family

    family = detect_family(tok)
    if family.name == "plain":
        return []
    return [i for t in family.stop_tokens if (i := tok.token_to_id(t)) is not None]


def lookup_speed(engine, new_tokens: int, rounds: int = 2) -> dict:
    """`lookup_speed_at` for cursors inside the files (`lookup_*`) and at their ends,
    where the files are being written (`lookup_*_end`)."""
    inside = lookup_speed_at(engine, new_tokens, rounds, at_end=False)
    end = lookup_speed_at(engine, new_tokens, rounds, at_end=True)
    return {**inside, **{f"{k}_end": v for k, v in end.items()}}


def lookup_speed_at(engine, new_tokens: int, rounds: int = 2, at_end: bool = False) -> dict:
    """Completions as the server asks for them (its prompts, its stop tokens, at most
    `new_tokens`), decoded with and without prompt lookup: decode time only (the prompts
    are prefilled before the timing), each prompt decoded both ways back to back (in
    alternating order, `rounds` times) so that both see the same machine load; the
    outputs must be identical."""
    from codevista.models.engine import SamplingParams
    from codevista.server.prompts import model_prompt_tokens, prompt_budget
    from codevista.server.settings import Settings

    budget = prompt_budget(Settings().context_tokens, engine.model.max_positions, new_tokens,
                           model_prompt_tokens(engine.loaded.path))
    prompts = lookup_prompts(engine.tokenizer, budget, at_end=at_end)
    stops = completion_stops(engine.tokenizer)
    params = SamplingParams(max_new_tokens=new_tokens, stop_token_ids=tuple(stops),
                            ignore_eos=not stops)
    engine.cache.clear()
    for ids in prompts:  # prefill outside the timing: only decoding is compared
        engine.generate(ids, SamplingParams(max_new_tokens=1, ignore_eos=True))
    secs = {False: 0.0, True: 0.0}
    outs: dict[bool, list] = {False: [], True: []}
    drafted = accepted = 0
    for rnd in range(rounds):
        for i, ids in enumerate(prompts):
            for on in ((False, True) if (i + rnd) % 2 == 0 else (True, False)):
                engine.lookup = on
                before = engine.stats()
                r = engine.generate(ids, params)
                after = engine.stats()
                secs[on] += r.total_s - r.ttft_s
                if rnd == 0:
                    outs[on].append(r.token_ids)
                    drafted += after.drafted - before.drafted
                    accepted += after.accepted - before.accepted
    engine.lookup = False
    same = outs[True] == outs[False]
    decoded = sum(max(0, len(o) - 1) for o in outs[True])  # tokens after each first one
    return {"lookup_speedup": round(secs[False] / secs[True], 2),
            "lookup_identical": same, "lookup_prompts": len(prompts),
            "lookup_tokens": decoded,
            "lookup_acceptance": round(accepted / max(1, drafted), 3),
            "lookup_tokens_per_step": round(decoded / max(1, decoded - accepted), 2)}


def worker_transformers(model_dir: Path, lengths: list[int], decode_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict = {"engine": "transformers-float32",
                 "load_s": round(time.perf_counter() - t0, 2)}
    vocab = model.config.vocab_size

    def gen(ids: list[int], new: int) -> float:
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(x, do_sample=False, max_new_tokens=new, min_new_tokens=new,
                           pad_token_id=0)
        return time.perf_counter() - t

    gen(_prompt(512, vocab), 2)  # warm-up, as the codevista engine does at start
    for n in lengths:
        out[f"prefill_tps_{n}"] = round(n / gen(_prompt(n, vocab), 1), 2)
    out["ttft_cold_s"] = round(lengths[-1] / out[f"prefill_tps_{lengths[-1]}"], 3)
    # transformers has no cross-request prefix cache; reuse its KV cache by hand.
    longest = _prompt(lengths[-1], vocab)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(torch.tensor([longest]), past_key_values=cache, use_cache=True)
        t = time.perf_counter()
        logits = model(torch.tensor([[11]]), past_key_values=cache, use_cache=True).logits
        int(logits[0, -1].argmax())
        out["ttft_append_s"] = round(time.perf_counter() - t, 4)
    # Decode rate inside one generate call: a logits processor notes when each step's
    # logits are ready (two separate calls, subtracted, go negative on a busy machine).
    stamps: list[float] = []

    def note(input_ids, scores):
        stamps.append(time.perf_counter())
        return scores

    with torch.inference_mode():
        model.generate(torch.tensor([_prompt(64, vocab)]), do_sample=False,
                       max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1,
                       pad_token_id=0, logits_processor=[note])
    out["decode_tps"] = round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2)
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def worker_llamacpp(gguf: Path, lengths: list[int], decode_tokens: int, kind: str) -> dict:
    import torch
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=max(lengths) + decode_tokens + 16, n_batch=512,
                n_threads=torch.get_num_threads(), verbose=False)
    out: dict = {"engine": f"llama.cpp-{kind}", "load_s": round(time.perf_counter() - t0, 2)}
    vocab = llm.n_vocab()

    def first_token_s(ids: list[int]) -> float:
        t = time.perf_counter()
        next(iter(llm.create_completion(ids, max_tokens=1, temperature=0.0, top_k=1,
                                        repeat_penalty=1.0, stream=True)))
        return time.perf_counter() - t

    first_token_s(_prompt(64, vocab))  # warm-up
    for n in lengths:
        llm.reset()
        out[f"prefill_tps_{n}"] = round(n / first_token_s(_prompt(n, vocab)), 2)
    out["ttft_cold_s"] = round(lengths[-1] / out[f"prefill_tps_{lengths[-1]}"], 3)
    longest = _prompt(lengths[-1], vocab)
    times = []
    for extra in range(3):  # llama-cpp-python reuses the common prefix of its last prompt
        times.append(first_token_s(longest + [11 + i for i in range(extra + 1)]))
    out["ttft_append_s"] = round(statistics.median(times), 4)
    llm.reset()
    stamps = []
    for _ in llm.create_completion(_prompt(64, vocab), max_tokens=decode_tokens + 1,
                                   temperature=0.0, top_k=1, repeat_penalty=1.0, stream=True):
        stamps.append(time.perf_counter())
    out["decode_tps"] = round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2)
    out["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    return out


def machine_limits() -> dict:
    """Memory bandwidth (best of 3 copies of 512 MiB) and float32 matmul throughput."""
    import numpy as np
    import torch

    a = np.ones(1 << 27, dtype=np.float32)
    b = np.empty_like(a)
    best_copy = min(_timed(lambda: np.copyto(b, a)) for _ in range(3))
    t = torch.ones(1 << 28)  # 1 GiB read by every thread, as a decode step reads weights
    t.sum()
    best_read = min(_timed(lambda: t.sum()) for _ in range(3))
    x = torch.randn(2048, 2048)
    torch.matmul(x, x)
    best_mm = min(_timed(lambda: torch.matmul(x, x)) for _ in range(3))
    return {"copy_gb_s": round(2 * a.nbytes / best_copy / 1e9, 2),
            "read_gb_s": round(4 * (1 << 28) / best_read / 1e9, 2),
            "matmul_gflop_s": round(2 * 2048 ** 3 / best_mm / 1e9, 1)}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes(model_dir: Path) -> int:
    """Bytes of weights a decode step reads (float32 checkpoint on disk)."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def int8_bytes(model_dir: Path) -> int:
    """Bytes a decode step reads with int8 weights: one per linear weight, four per scale,
    norm and (untied) embedding row actually used."""
    from codevista.models.loader import load_model

    loaded = load_model(model_dir, dtype="int8")
    total = 0
    for name, t in list(loaded.model.named_buffers()) + list(loaded.model.named_parameters()):
        if name.startswith("embed."):
            continue  # an embedding table is read one row per token
        total += t.numel() * t.element_size()
    return total


def int8_accuracy(model_dir: Path, tokens: int = 64) -> dict:
    """Int8 against float32 on the same prompts: the largest logit error (absolute, and
    relative to the largest logit) over every prompt position, and greedy agreement: the
    share of prompts whose `tokens` greedy tokens are identical, and of positions that
    match before the first divergence."""
    import torch
    from codevista.models.engine import Engine, SamplingParams
    from codevista.models.kv_cache import KVCache
    from codevista.models.loader import load_model

    f32 = load_model(model_dir)
    q8 = load_model(model_dir, dtype="int8")
    cfg = f32.config
    if (model_dir / "tokenizer.json").is_file():
        prompts = lookup_prompts(f32.tokenizer, min(256, f32.model.max_positions - tokens),
                                 cuts=3)
    else:
        prompts = [_prompt(128, cfg.vocab_size)[i:] for i in range(0, 40, 10)]
    err = rel = 0.0
    same = 0
    prefix = 0
    with Engine(f32, lookup=False) as e1, Engine(q8, lookup=False) as e2:
        for ids in prompts:
            logits = []
            for m in (f32, q8):  # in 16-token steps: the path decoding and drafts take
                cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(ids),
                                torch.float32)
                logits.append(torch.cat([
                    m.model(torch.tensor(ids[i:i + 16]), cache, i, all_logits=True)
                    for i in range(0, len(ids), 16)]))
            d = (logits[0] - logits[1]).abs().max().item()
            err = max(err, d)
            rel = max(rel, d / logits[0].abs().max().item())
            p = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
            a, b = e1.generate(ids, p).token_ids, e2.generate(ids, p).token_ids
            same += a == b
            prefix += next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return {"prompts": len(prompts), "max_logit_abs_error": round(err, 4),
            "max_logit_rel_error": round(rel, 4),
            "greedy_identical_share": round(same / len(prompts), 3),
            "greedy_tokens_before_divergence_share": round(prefix / (tokens * len(prompts)),
                                                           3)}


def best(runs: list[dict]) -> dict:
    """Per metric, the best of several runs (highest rate, lowest time or memory)."""
    out = dict(runs[0])
    for key in out:
        values = [r[key] for r in runs]
        if "_tps" in key:
            out[key] = max(values)
        elif key.endswith("_s") or key.endswith("_mb"):
            out[key] = min(values)
    return out


def weights_key(model_dir: Path) -> str:
    """A short digest of a checkpoint's config and weights (each file's size and its first
    and last MiB), to name the GGUF files exported from it."""
    import hashlib

    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        with f.open("rb") as fh:
            h.update(str(size).encode() + fh.read(2**20))
            fh.seek(max(0, size - 2**20))
            h.update(fh.read())
    return h.hexdigest()[:12]


def burst_runner(name: str, model: Path, gguf: Path | None, tokens: int):
    """A decode burst function for one engine: `tokens` greedy tokens after a 64-token
    prompt, returning tokens/s after the first token."""
    if name.startswith("codevista-"):
        from codevista.models.engine import Engine, SamplingParams
        from codevista.models.loader import load_model

        e = Engine(load_model(model, dtype=name.split("-", 1)[1]), cache_bytes=1 << 30,
                   warmup=True, lookup=False).start()
        vocab = e.loaded.config.vocab_size

        def run() -> float:
            e.cache.clear()
            r = e.generate(_prompt(64, vocab), SamplingParams(max_new_tokens=tokens + 1,
                                                               ignore_eos=True))
            return tokens / (r.total_s - r.ttft_s)
        return run
    import torch
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_batch=512,
                n_threads=torch.get_num_threads(), verbose=False)

    def run() -> float:
        llm.reset()
        stamps = []
        for _ in llm.create_completion(_prompt(64, llm.n_vocab()), max_tokens=tokens + 1,
                                       temperature=0.0, top_k=1, repeat_penalty=1.0,
                                       stream=True):
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return run


def burst_worker(name: str, model: Path, gguf: Path | None, tokens: int) -> None:
    """Serve bursts on request: a line "go" on stdin -> one burst, its rate on stdout."""
    run = burst_runner(name, model, gguf, tokens)
    run()  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        print(run(), flush=True)


def interleaved(model: Path, ggufs: dict[str, Path], dtypes: list[str], rounds: int,
                tokens: int) -> dict:
    """Every engine in its own process, all loaded at once; bursts alternate between them,
    so that they see the same machine load. Separate processes, because engines sharing
    one process slow each other without using the CPU: llama.cpp and torch load the same
    OpenMP runtime, which spins far less before sleeping once a process holds more OpenMP
    threads than there are cores (llama.cpp q8_0 decoded 47 -> 38 tok/s here while an
    idle codevista engine merely existed in its process)."""
    names = [f"codevista-{d}" for d in dtypes] + list(ggufs)
    procs = {}
    try:
        for name in names:
            cmd = [sys.executable, __file__, "--worker", f"burst:{name}", "--model", str(model),
                   "--decode-tokens", str(tokens)]
            if name in ggufs:
                cmd += ["--gguf", str(ggufs[name])]
            procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True, env=os.environ.copy())
            if procs[name].stdout.readline().strip() != "ready":
                raise SystemExit(f"{name} burst worker failed to start")
        rates: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(rounds):
            for name, proc in procs.items():
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    raise SystemExit(f"{name} burst worker died")
                rates[name].append(float(line))
    finally:
        for proc in procs.values():
            try:
                proc.stdin.close()
            except OSError:
                pass
            proc.wait(timeout=60)
    med = {name: round(statistics.median(r), 2) for name, r in rates.items()}
    out: dict = {"interleaved_decode_tps": med, "rounds": rounds, "tokens": tokens,
                 "processes": "one per engine"}
    for d in dtypes:
        for name in ggufs:
            out[f"codevista-{d}_vs_{name}"] = round(med[f"codevista-{d}"] / med[name], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint directory (default: random 0.5B)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, short prompts")
    ap.add_argument("--cache", type=Path, default=CACHE, help="where random models are kept")
    ap.add_argument("--lengths", default=None, help="prompt lengths, e.g. 512,2048")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per engine, alternated; the best of each metric is kept "
                         "(shared machines are noisy)")
    ap.add_argument("--dtypes", default="float32,int8",
                    help="codevista weight types to run (float32, bfloat16, int8)")
    ap.add_argument("--llamacpp", default="",
                    help="GGUF types to run with llama.cpp too, e.g. f32,f16,q8_0")
    ap.add_argument("--interleaved", type=int, default=0, metavar="N",
                    help="decode only: every engine loaded at once (a process each), N "
                         "alternated bursts")
    ap.add_argument("--lookup-only", action="store_true",
                    help="only prompt lookup (lookup_speed), each dtype in its own process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    lengths = [int(x) for x in (args.lengths or ("64,256" if args.quick else "512,2048")
                                ).split(",")]
    if args.worker and args.worker.startswith("burst:"):
        burst_worker(args.worker.split(":", 1)[1], args.model, args.gguf, args.decode_tokens)
        return
    if args.worker and args.worker.startswith("lookup:"):
        print(json.dumps(worker_lookup(args.model, args.decode_tokens,
                                       args.worker.split(":", 1)[1])), flush=True)
        return
    if args.worker:
        if args.worker.startswith("codevista-"):
            res = worker_codevista(args.model, lengths, args.decode_tokens,
                                   args.worker.split("-", 1)[1])
        elif args.worker.startswith("llama.cpp-"):
            res = worker_llamacpp(args.gguf, lengths, args.decode_tokens,
                                  args.worker.split("-", 1)[1])
        else:
            res = worker_transformers(args.model, lengths, args.decode_tokens)
        print(json.dumps(res), flush=True)
        return
    model = args.model or make_random_checkpoint(
        args.cache / ("tiny-random" if args.quick else "qwen2.5-coder-0.5b-shape-random"),
        TINY if args.quick else QWEN_05B)
    if args.lookup_only:
        for d in filter(None, args.dtypes.split(",")):
            cmd = [sys.executable, __file__, "--worker", f"lookup:{d}", "--model",
                   str(model), "--decode-tokens", str(args.decode_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"lookup worker ({d}) failed")
            print(proc.stdout.strip().splitlines()[-1], flush=True)
        return
    dtypes = [d for d in args.dtypes.split(",") if d]
    runs: dict[str, list[dict]] = {f"codevista-{d}": [] for d in dtypes}
    runs["transformers"] = []
    ggufs: dict[str, Path] = {}
    for kind in filter(None, args.llamacpp.split(",")):
        from codevista.models.gguf_export import export_gguf

        # keyed by the weights: a retrained model in the same folder gets a new file
        path = args.cache / f"{model.name}-{weights_key(Path(model))}-{kind}.gguf"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            export_gguf(model, path, kind)
        ggufs[f"llama.cpp-{kind}"] = path
        runs[f"llama.cpp-{kind}"] = []
    if args.interleaved:
        print(json.dumps({"model": model.name, **interleaved(
            Path(model), ggufs, dtypes, args.interleaved, args.decode_tokens)}), flush=True)
        return
    for _ in range(args.repeat):
        for name in runs:
            cmd = [sys.executable, __file__, "--worker", name, "--model", str(model),
                   "--lengths", ",".join(map(str, lengths)),
                   "--decode-tokens", str(args.decode_tokens)]
            if name in ggufs:
                cmd += ["--gguf", str(ggufs[name])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"{name} worker failed")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results = {name: best(r) for name, r in runs.items()}
    for res in results.values():
        print(json.dumps({"model": model.name, "runs": args.repeat, **res}), flush=True)
    hf = results["transformers"]
    ratios: dict = {"ratios": "codevista / reference (above 1: codevista faster or larger)"}
    for d in dtypes:
        cv = results[f"codevista-{d}"]
        r = {"decode_vs_transformers": round(cv["decode_tps"] / hf["decode_tps"], 2),
             **{f"prefill_{n}_vs_transformers": round(
                 cv[f"prefill_tps_{n}"] / hf[f"prefill_tps_{n}"], 2) for n in lengths},
             "ttft_cold_speedup_vs_transformers": round(hf["ttft_cold_s"] / cv["ttft_cold_s"],
                                                        2),
             "ttft_append_over_decode_step": round(cv["ttft_append_s"] * cv["decode_tps"], 2),
             "peak_rss_vs_transformers": round(cv["peak_rss_mb"] / hf["peak_rss_mb"], 2)}
        for name in ggufs:
            lc = results[name]
            r[f"decode_vs_{name}"] = round(cv["decode_tps"] / lc["decode_tps"], 2)
            r[f"prefill_{lengths[-1]}_vs_{name}"] = round(
                cv[f"prefill_tps_{lengths[-1]}"] / lc[f"prefill_tps_{lengths[-1]}"], 2)
        ratios[f"codevista-{d}"] = r
    if "int8" in dtypes:
        print(json.dumps({"int8_accuracy": int8_accuracy(Path(model))}), flush=True)
    limits = machine_limits()
    fp32_bytes = weight_bytes(Path(model))
    per_engine = {name: (ggufs[name].stat().st_size if name in ggufs
                         else int8_bytes(Path(model)) if name == "codevista-int8"
                         else fp32_bytes // 2 if name == "codevista-bfloat16" else fp32_bytes)
                  for name in results}
    limits["decode_percent_of_bandwidth_limit"] = {
        name: round(100 * results[name]["decode_tps"] * per_engine[name]
                    / (max(limits["copy_gb_s"], limits["read_gb_s"]) * 1e9), 1)
        for name in results}
    print(json.dumps({"machine": limits, "weight_bytes": per_engine}), flush=True)
    print(json.dumps(ratios), flush=True)


if __name__ == "__main__":
    main()
