"""The training recipe of the embedded default model: resumable, seeded, CPU by default.

    python -m codevista.models.train.train prepare --corpus DIR --pairs DIR --run DIR
    python -m codevista.models.train.train train --run DIR [--steps N] [--device cpu|cuda]
    python -m codevista.models.train.train pairs --pairs DIR --run DIR
    python -m codevista.models.train.train train --run DIR --steps N --restart STEP \
        --pair-fraction F

`pairs` tokenizes the Java <-> C# pairs alone (train split, and valid for a separate
translation loss) with the run's tokenizer; `--pair-fraction F` then draws that share of
every batch from them, so a continued run can weight translation without re-preparing the
code mix. `--restart STEP` starts a new warm-up and cosine schedule at that step (a
continued run from an earlier checkpoint); without it the schedule spans steps 0..N.

`prepare` fits the tokenizer and tokenizes the train and valid mixes (see data.py);
`train` runs AdamW with warm-up and cosine decay, checkpoints every --save-every steps
(safetensors for weights and optimizer state, JSON for the rest; never pickle), resumes
from the last checkpoint after any interruption, and exports an HF checkpoint directory
(`RUN/latest-hf`) plus a loss plot (`RUN/loss.png`) at every checkpoint. Batches are drawn
from a generator seeded by (seed, step), so a resumed run sees the same data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .data import CHUNK_CHARS, build_samples, tokenize
from .model import CodeLM, ModelShape, export_hf, shape_of
from .plot import plot_losses

log = logging.getLogger("codevista.train")

# Bytes of each language's train files rendered into the mix (about 3.3 bytes per token).
LANG_BYTES = {"python": 24, "java": 14, "javascript": 8, "typescript": 6, "go": 10,
              "rust": 10, "c": 8, "cpp": 8}


def prepare(args: argparse.Namespace) -> None:
    from .tokenizer import train_tokenizer

    run: Path = args.run
    run.mkdir(parents=True, exist_ok=True)
    tok_dir = run / "tokenizer"
    vocab = args.vocab
    if args.tokenizer is not None:  # reuse a fitted tokenizer (the shipped model's ids)
        tok_dir.mkdir(exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(args.tokenizer / name, tok_dir / name)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
    else:
        train_tokenizer(args.corpus, args.pairs, tok_dir, vocab=vocab, seed=args.seed)
    weights = dict(LANG_BYTES)
    for item in args.weight:
        lang, _, factor = item.partition("=")
        if lang not in weights or not factor:
            raise SystemExit(f"--weight {item!r}: expected LANG=FACTOR, LANG one of "
                             f"{', '.join(weights)}")
        weights[lang] *= float(factor)
    budgets = {k: int(v * args.scale * 1e6) for k, v in weights.items()}
    for split, passes in (("train", args.pair_passes), ("valid", 1)):
        b = budgets if split == "train" else {k: 2_000_000 for k in budgets}
        samples = build_samples(args.corpus, args.pairs, split, b, passes, args.seed,
                                tuple(args.extra), args.chunk_chars)
        n_tokens, n_samples = tokenize(samples, tok_dir / "tokenizer.json", run / split)
        log.info("%s: %d samples, %.1fM tokens", split, n_samples, n_tokens / 1e6)
    (run / "prepare.json").write_text(json.dumps(
        {"corpus": str(args.corpus), "pairs": str(args.pairs), "vocab": vocab,
         "scale": args.scale, "pair_passes": args.pair_passes, "seed": args.seed,
         "chunk_chars": args.chunk_chars,
         "lang_bytes": budgets, "extra": [str(p) for p in args.extra],
         "tokenizer": str(args.tokenizer) if args.tokenizer else None}, indent=1))


def prepare_pairs(args: argparse.Namespace) -> None:
    """Tokenize the translation pairs, both directions, with the run's own tokenizer."""
    from .data import read_pairs, render_pair

    tok = args.run / "tokenizer" / "tokenizer.json"
    if not tok.is_file():
        raise SystemExit(f"{tok} not found: run `prepare` first")
    for split in ("train", "valid"):
        samples = []
        for java, cs in read_pairs(args.pairs, split):
            samples.append(render_pair("java", java, "csharp", cs))
            samples.append(render_pair("csharp", cs, "java", java))
        n_tokens, n_samples = tokenize(samples, tok, args.run / f"pairs-{split}")
        log.info("pairs %s: %d samples, %.2fM tokens", split, n_samples, n_tokens / 1e6)


class Batches:
    """Sequences starting at sample boundaries, packed to seq_len+1 tokens. Targets in
    `unscored` (the language tags, which open every sample and every prompt, and are never
    the model's to write) are not scored."""

    def __init__(self, prefix: Path, seq_len: int, unscored: tuple[int, ...] = ()) -> None:
        self.tokens = np.load(f"{prefix}.tokens.npy", mmap_mode="r")
        starts = np.load(f"{prefix}.starts.npy")
        self.starts = starts[starts + seq_len + 1 <= len(self.tokens)]
        self.seq_len = seq_len
        self.unscored = np.asarray(unscored, dtype=np.int64)

    def get(self, rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        picks = rng.choice(self.starts, size=batch)
        rows = np.stack([self.tokens[s:s + self.seq_len + 1] for s in picks]).astype(np.int64)
        x, y = rows[:, :-1], rows[:, 1:].copy()
        if len(self.unscored):
            y[np.isin(y, self.unscored)] = -1
        return torch.from_numpy(x), torch.from_numpy(y)


def language_tag_ids(tokenizer_json: Path) -> tuple[int, ...]:
    from tokenizers import Tokenizer

    from .. import formats

    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = (tok.token_to_id(formats.lang_tag(lang)) for lang in formats.LANGUAGES)
    return tuple(i for i in ids if i is not None)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float,
          start: int = 0) -> float:
    """Linear warm-up, then cosine to `floor` at `total`; a schedule that begins at step
    `start` (a continued run's `--restart`)."""
    step, total = step - start, total - start
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def checked_restart(args: argparse.Namespace) -> int:
    restart = args.restart or 0
    if not 0 <= restart < args.steps:
        raise SystemExit(f"--restart {restart} must lie in [0, --steps {args.steps})")
    return restart


def save_checkpoint(run: Path, model: CodeLM, opt: torch.optim.AdamW, state: dict) -> None:
    from safetensors.torch import save_file

    tmp = run / "ckpt.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    optim: dict[str, torch.Tensor] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                for key in ("exp_avg", "exp_avg_sq"):
                    optim[f"{key}.{names[id(p)]}"] = st[key].contiguous()
                optim[f"step.{names[id(p)]}"] = torch.as_tensor(st["step"]).reshape(1).float()
    save_file(optim, str(tmp / "optim.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    final = run / "ckpt"
    old = run / "ckpt.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run: Path, model: CodeLM, opt: torch.optim.AdamW) -> dict | None:
    from safetensors.torch import load_file

    ckpt = run / "ckpt"
    if not (ckpt / "state.json").is_file():
        return None
    model.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    optim = load_file(str(ckpt / "optim.safetensors"))
    for n, p in model.named_parameters():
        if f"exp_avg.{n}" in optim:
            opt.state[p] = {"exp_avg": optim[f"exp_avg.{n}"].to(p.device),
                            "exp_avg_sq": optim[f"exp_avg_sq.{n}"].to(p.device),
                            "step": optim[f"step.{n}"].reshape(()).to(p.device)}
    return json.loads((ckpt / "state.json").read_text())


@torch.no_grad()
def evaluate(model: CodeLM, valid: Batches, batch: int, device: str, n: int = 4) -> float:
    model.eval()
    rng = np.random.default_rng(12345)
    losses = []
    for _ in range(n):
        x, y = valid.get(rng, batch)
        losses.append(float(model(x.to(device), y.to(device))[1]))
    model.train()
    return sum(losses) / len(losses)


def init_from_hf(model: CodeLM, directory: Path) -> None:
    """Start a run from a released checkpoint (its config must have the run's shape):
    a continued model keeps everything it learned, and its tokenizer's ids."""
    from safetensors.torch import load_file

    theirs, ours = shape_of(directory), model.shape
    fields = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
              "intermediate_size")
    wrong = {f: (getattr(theirs, f), getattr(ours, f)) for f in fields
             if getattr(theirs, f) != getattr(ours, f)}
    if wrong:
        raise SystemExit(f"{directory} does not have the run's shape "
                         f"(checkpoint, run): {wrong}")
    weights = load_file(str(directory / "model.safetensors"))
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    log.info("initialised from %s", directory)


def amp_context(mode: str, device: str):
    """bf16 autocast (weights and optimizer stay float32): "auto" uses it on CUDA only;
    "bf16" also on a CPU (about twice float32's speed on one with AVX-512 BF16)."""
    if mode == "auto":
        mode = "bf16" if str(device).startswith("cuda") else "none"
    if mode == "bf16":
        return lambda: torch.autocast(str(device).split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext


class TimeBudget:
    """The number of steps of a run that must end within `seconds` of its start.

    With a budget, the total is fixed once, from the step rate measured over CALIBRATE
    steps after SKIP warm-up steps (compilation, allocator), keeping RESERVE of the budget
    for evaluations and checkpoints; until then the total is `max_steps` (the schedule's
    warm-up does not depend on it). A resumed run keeps the total it fixed."""

    SKIP, CALIBRATE, RESERVE = 5, 20, 0.08

    def __init__(self, seconds: float | None, fixed: int | None, max_steps: int,
                 first_step: int) -> None:
        self.seconds, self.total = seconds, fixed or max_steps
        self.pending = seconds is not None and fixed is None
        self.start, self.first = time.time(), first_step
        self.t0: float | None = None
        self.seconds_per_step = 0.0
        self.max_steps = max_steps
        self.again: tuple[int, float, int] | None = None

    def tick(self, step: int) -> bool:
        """Called after each step; True when the total was just fixed or cut. A run that
        slows down after calibration (a shared machine) stops at the budget regardless."""
        if self.seconds is not None and not self.pending and step < self.total and (
                time.time() - self.start > self.seconds * (1 - self.RESERVE / 2)):
            self.total = step
            return True
        if not self.pending:
            return self.measure_again(step)
        done = step - self.first
        if done == self.SKIP:
            self.t0 = time.time()
        elif done == self.SKIP + self.CALIBRATE and self.t0 is not None:
            now = time.time()
            self.fit(step, now, (now - self.t0) / self.CALIBRATE)
            self.pending = False
            # measured once more over a longer stretch (the first steps can run beside
            # other start-up work on a shared machine)
            if self.total - step > 40:
                self.again = (step, now, step + (self.total - step) // 3)
            return True
        return False

    def measure_again(self, step: int) -> bool:
        """At a third of the run: the total from the rate since the first measurement."""
        if self.again is None or step != self.again[2]:
            return False
        now = time.time()
        self.fit(step, now, (now - self.again[1]) / (step - self.again[0]))
        self.again = None
        return True

    def fit(self, step: int, now: float, seconds_per_step: float) -> None:
        """The total that ends within the budget less the reserve at this step rate."""
        self.seconds_per_step = seconds_per_step
        left = self.seconds * (1 - self.RESERVE) - (now - self.start)
        self.total = max(step + 1, min(self.max_steps, step + int(left / seconds_per_step)))


def train(args: argparse.Namespace) -> None:
    run: Path = args.run
    device = args.device
    torch.manual_seed(args.seed)
    eos_id = 0  # <|endoftext|> is the first special token
    vocab = json.loads((run / "prepare.json").read_text())["vocab"]
    shape = ModelShape(vocab_size=vocab, hidden_size=args.dim, num_layers=args.layers,
                       num_heads=args.heads, num_kv_heads=args.kv_heads,
                       intermediate_size=args.ffn)
    saved = run / "ckpt" / "state.json"
    if saved.is_file():
        saved_shape = json.loads(saved.read_text())["shape"]
        if saved_shape != asdict(shape):
            raise SystemExit(
                f"the checkpoint in {run} has shape {saved_shape}; pass the same "
                "--dim/--layers/--heads/--kv-heads/--ffn to resume it "
                f"(got {asdict(shape)})")
    model = CodeLM(shape).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.1, eps=1e-8)
    state = load_checkpoint(run, model, opt)
    if state is None and args.init_hf is not None:
        init_from_hf(model, args.init_hf)
    state = state or {
        "step": 0, "tokens": 0, "train_loss": [], "valid_loss": [], "seconds": 0.0,
        "shape": asdict(shape), "args": {k: str(v) for k, v in vars(args).items()},
        "device": device}
    if state["shape"] != asdict(shape):
        raise SystemExit(f"checkpoint shape {state['shape']} differs from {asdict(shape)}")
    log.info("model: %.2fM parameters; resuming at step %d", model.num_parameters() / 1e6,
             state["step"])
    tags = language_tag_ids(run / "tokenizer" / "tokenizer.json")
    train_data = Batches(run / "train", args.seq_len, tags)
    valid_data = Batches(run / "valid", args.seq_len, tags)
    n_pairs = round(args.pair_fraction * args.batch)
    if n_pairs and not (run / "pairs-train.tokens.npy").is_file():
        raise SystemExit(f"--pair-fraction needs {run}/pairs-train.*: run `pairs` first")
    pair_data = Batches(run / "pairs-train", args.seq_len, tags) if n_pairs else None
    pair_valid = (Batches(run / "pairs-valid", args.seq_len, tags)
                  if (run / "pairs-valid.tokens.npy").is_file() else None)
    restart = checked_restart(args)
    step_fn = torch.compile(model) if args.compile else model
    amp = amp_context(args.amp, device)
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    # a total fixed by a time budget holds for the schedule it was fixed in (a --restart
    # starts a new one)
    kept = (state.get("total_steps")
            if state.get("total_restart", 0) == restart else None)
    budget = TimeBudget(args.time_budget, kept, args.steps, state["step"])
    t_last = time.time()
    running: list[float] = []
    while state["step"] < budget.total:
        step = state["step"]
        lr = lr_at(step, budget.total, args.lr, args.warmup, args.lr / 10, restart)
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([args.seed, step])
        x, y = train_data.get(rng, args.batch - n_pairs)
        if pair_data is not None:
            px, py = pair_data.get(rng, n_pairs)
            x, y = torch.cat([x, px]), torch.cat([y, py])
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        try:
            with amp():
                _, loss = step_fn(x, y)
            assert loss is not None
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except Exception:
            if step_fn is model:
                raise
            # a compiler that fails on this machine: the same step, eagerly
            log.exception("compiled step failed; continuing without torch.compile")
            step_fn = model
            opt.zero_grad(set_to_none=True)
            with amp():
                _, loss = model(x, y)
            assert loss is not None
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if budget.tick(step + 1):
            state["total_steps"], state["total_restart"] = budget.total, restart
            log.info("time budget: %d steps in all (%.3f s a step, measured)", budget.total,
                     budget.seconds_per_step)
        running.append(float(loss.detach()))
        state["step"] = step + 1
        state["tokens"] += args.batch * args.seq_len
        if state["step"] % args.log_every == 0:
            now = time.time()
            dt = now - t_last
            state["seconds"] += dt
            t_last = now
            avg = sum(running) / len(running)
            state["train_loss"].append([state["step"], avg])
            running = []
            tps = args.log_every * args.batch * args.seq_len / dt
            print(f"step {state['step']}/{budget.total} loss {avg:.3f} lr {lr:.2e} "
                  f"{tps:.0f} tok/s", file=sys.stderr, flush=True)
        if state["step"] % args.save_every == 0 or state["step"] == budget.total:
            with amp():
                vl = evaluate(model, valid_data, args.batch, device)
            state["valid_loss"].append([state["step"], vl])
            msg = f"step {state['step']} valid loss {vl:.3f}"
            if pair_valid is not None:
                with amp():
                    pl = evaluate(model, pair_valid, args.batch, device, n=2)
                state.setdefault("pair_valid_loss", []).append([state["step"], pl])
                msg += f", translation valid loss {pl:.3f}"
            print(msg, file=sys.stderr, flush=True)
            save_checkpoint(run, model, opt, state)
            export_hf(model, run / "latest-hf.tmp", run / "tokenizer", eos_id,
                      context=args.context or args.seq_len)
            shutil.rmtree(run / "latest-hf", ignore_errors=True)
            (run / "latest-hf.tmp").rename(run / "latest-hf")
            curves = {"train": [tuple(p) for p in state["train_loss"]],
                      "valid": [tuple(p) for p in state["valid_loss"]]}
            if state.get("pair_valid_loss"):
                curves["translation valid"] = [tuple(p) for p in state["pair_valid_loss"]]
            plot_losses(curves,
                        run / "loss.png", f"codevista default model ({device})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--pairs", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies LANG_BYTES")
    p.add_argument("--weight", nargs="*", default=[], metavar="LANG=FACTOR",
                   help="multiplies one language's share of LANG_BYTES (e.g. python=2)")
    p.add_argument("--pair-passes", type=int, default=3)
    p.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS,
                   help="characters of a file per sample: the context the model learns to "
                        "use (about 3.3 characters a token; 1 500 shipped, ~3 300 fills "
                        "1 024 positions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra", type=Path, nargs="*", default=[],
                   help="more train files (JSONL from `corpus --extra-python`)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="reuse this fitted tokenizer instead of fitting one")
    t = sub.add_parser("train")
    t.add_argument("--run", type=Path, required=True)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--dim", type=int, default=256)
    t.add_argument("--layers", type=int, default=8)
    t.add_argument("--heads", type=int, default=8)
    t.add_argument("--kv-heads", type=int, default=4)
    t.add_argument("--ffn", type=int, default=704)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compile", action="store_true")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--pair-fraction", type=float, default=0.0,
                   help="share of each batch drawn from the pairs stream (see `pairs`)")
    t.add_argument("--init-hf", type=Path, default=None, metavar="DIR",
                   help="start from this exported model (same shape) instead of at random")
    t.add_argument("--context", type=int, default=None,
                   help="max_position_embeddings of the export (default --seq-len; a "
                        "model trained at 1 024 and continued on shorter rows keeps 1 024)")
    t.add_argument("--restart", type=int, default=None,
                   help="start a new warm-up and cosine schedule at this step")
    t.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="fix the number of steps (at most --steps) so that the run ends "
                        "within this many seconds, from its measured step rate")
    t.add_argument("--amp", choices=("auto", "bf16", "none"), default="auto",
                   help="bf16 autocast (auto: on CUDA only)")
    q = sub.add_parser("pairs")
    q.add_argument("--pairs", type=Path, required=True)
    q.add_argument("--run", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("CODEVISTA_LOG", "INFO"), stream=sys.stderr)
    {"prepare": prepare, "train": train, "pairs": prepare_pairs}[args.cmd](args)


if __name__ == "__main__":
    main()
