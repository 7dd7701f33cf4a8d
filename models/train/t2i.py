"""The training recipe of the default text-to-image model: a VQ image tokenizer, then a
decoder that writes an image's codes after its description.

    python -m codevista.models.train.t2i vq --run DIR [--steps N] [--batch B]
    python -m codevista.models.train.t2i lm --run DIR [--init models/default/code] [--steps N]
    python -m codevista.models.train.t2i export --run DIR --out models/default/t2i

Stage 1 (`vq`) trains models/vision/vq.py on 32x32 crops (aligned to the code grid) of
the generated pictures of t2i_data.py: reconstruction MSE plus codebook and commitment
terms, dead codes re-seeded every --reseed-every steps for the first 80 % of the run.

Stage 2 (`lm`) freezes the tokenizer and trains a Llama decoder whose vocabulary is the
code tokenizer's (`--init`, whose weights start it) extended with one token per codebook
entry and begin/end-image tokens. A sequence is the prompt, left-padded to PROMPT_TOKENS,
then begin-image, then the code grid row by row: every image position has the same
absolute position in every sequence. The loss covers the image codes only, as a softmax
over the codebook's tokens (generation samples from that range only, see
`SamplingParams.token_range`).

Data is drawn from (step, index) seeds, so a resumed run sees the same data. Checkpoints
(safetensors weights and optimizer state, JSON state) every --save-every steps; a loss
plot at every checkpoint. `export` writes the Hugging Face layout the server loads.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..tokenizer import Tokenizer
from ..vision.vq import VQConfig, VQModel, psnr, save_vq, to_pixels
from .model import CodeLM, ModelShape
from .plot import plot_losses
from .t2i_data import IMAGE_SIZE, scene
from .train import load_checkpoint, lr_at, save_checkpoint

log = logging.getLogger("codevista.train.t2i")
DEFAULT_INIT = Path(__file__).resolve().parents[1] / "default" / "code"
PROMPT_TOKENS = 60  # prompts are left-padded to this many tokens
VQ = VQConfig(image_size=IMAGE_SIZE, channels=(32, 64, 64), code_dim=32, codebook_size=256)
CROP = 32
BOI, EOI = "<|image_start|>", "<|image_end|>"
# Default sampling of the exported model, chosen on held-out prompts of other seeds than
# the benchmark's (greedy, T 1, T 0.7, top-k 2 and 3 compared on 24 shape prompts): as
# faithful as greedy, and the seed still matters.
SAMPLING = {"temperature": 0.5, "top_k": 3}


def code_token(i: int) -> str:
    return f"<|img_{i}|>"


# -- stage 1: the image tokenizer --------------------------------------------------------

def vq_batch(step: int, batch: int) -> torch.Tensor:
    """`batch` crops of CROP pixels, one per training picture, aligned to the code grid."""
    f = VQ.downsample
    crops = []
    for i in range(batch):
        s = scene("train", step * batch + i)
        rng = random.Random(f"crop:{step}:{i}")
        x, y = (rng.randrange(0, IMAGE_SIZE - CROP + 1, f) for _ in range(2))
        crops.append(s.image.crop((x, y, x + CROP, y + CROP)))
    return to_pixels(crops)


def held_out_images(n: int = 48) -> torch.Tensor:
    return to_pixels([scene("test", 50_000 + i).image for i in range(n)])


def train_vq(args: argparse.Namespace) -> None:
    run: Path = args.run
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model = VQModel(VQ)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=0.0)
    state = load_checkpoint(run, model, opt) or {
        "step": 0, "train_loss": [], "valid_loss": [], "seconds": 0.0, "usage": [],
        "psnr": [], "reseeded": 0, "args": {k: str(v) for k, v in vars(args).items()}}
    gen = torch.Generator().manual_seed(args.seed)
    log.info("VQ: %.2fM parameters, grid %d, codebook %d; resuming at step %d",
             sum(p.numel() for p in model.parameters()) / 1e6, VQ.grid, VQ.codebook_size,
             state["step"])
    valid = held_out_images()
    t_last, losses = time.time(), []
    while state["step"] < args.steps:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_at(step, args.steps, 1.0, args.warmup, 0.05)
        x = vq_batch(step, args.batch)
        rec, _, vq_loss = model(x)
        loss = F.mse_loss(rec, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        state["step"] = step + 1
        if state["step"] % args.reseed_every == 0 and state["step"] < 0.8 * args.steps:
            usage = model.quantizer.usage()
            n = model.quantizer.reseed_dead(gen)
            state["reseeded"] += n
            state["usage"].append([state["step"], usage])
            print(f"step {state['step']} codebook usage {usage:.2f}, re-seeded {n}",
                  file=sys.stderr, flush=True)
        if state["step"] % args.log_every == 0:
            dt, t_last = time.time() - t_last, time.time()
            state["seconds"] += dt
            avg = sum(losses) / len(losses)
            losses = []
            state["train_loss"].append([state["step"], avg])
            print(f"step {state['step']}/{args.steps} loss {avg:.4f} "
                  f"{args.log_every / dt:.2f} steps/s", file=sys.stderr, flush=True)
        if state["step"] % args.save_every == 0 or state["step"] == args.steps:
            model.eval()
            with torch.no_grad():
                rec, idx, _ = model(valid)
                vl = float(F.mse_loss(rec, valid))
                p = psnr(rec, valid)
                used = len(torch.unique(idx)) / VQ.codebook_size
            model.train()
            state["valid_loss"].append([state["step"], vl])
            state["psnr"].append([state["step"], p, used])
            print(f"step {state['step']} held-out mse {vl:.4f} psnr {p:.2f} dB, codes used "
                  f"{used:.2f}", file=sys.stderr, flush=True)
            save_checkpoint(run, model, opt, state)
            plot_losses({"train": [tuple(q) for q in state["train_loss"]],
                         "valid": [tuple(q) for q in state["valid_loss"]]},
                        run / "loss.png", "image tokenizer (VQ)")


def load_trained_vq(run: Path) -> VQModel:
    from safetensors.torch import load_file

    model = VQModel(VQ)
    model.load_state_dict(load_file(str(run / "ckpt" / "model.safetensors")))
    return model.eval()


# -- stage 2: the decoder ---------------------------------------------------------------

def extend_tokenizer(src: Path, out: Path, codebook: int) -> None:
    """The code tokenizer with one added token per code, then begin/end-image (special)."""
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    base = max(len(data["model"]["vocab"]),
               1 + max((t["id"] for t in data["added_tokens"]), default=-1))
    extra = [code_token(i) for i in range(codebook)] + [BOI, EOI]
    for i, content in enumerate(extra):
        data["added_tokens"].append({
            "id": base + i, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": content in (BOI, EOI)})
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False),
                                        encoding="utf-8")
    shutil.copy(src / "tokenizer_config.json", out / "tokenizer_config.json")


class Layout:
    """Token ids of the image vocabulary and the fixed sequence layout."""

    def __init__(self, tok: Tokenizer, codebook: int, grid: int) -> None:
        first = tok.token_to_id(code_token(0))
        boi, eoi = tok.token_to_id(BOI), tok.token_to_id(EOI)
        pad = tok.token_to_id("<|endoftext|>")
        if first is None or boi is None or eoi is None or pad is None:
            raise ValueError("the tokenizer lacks the image tokens")
        self.tok, self.first, self.codebook, self.grid = tok, first, codebook, grid
        self.boi, self.eoi, self.pad = boi, eoi, pad

    def prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tok.encode(prompt, add_special_tokens=False)
        if len(ids) > PROMPT_TOKENS:
            raise ValueError(f"the prompt has {len(ids)} tokens; at most {PROMPT_TOKENS}")
        return [self.pad] * (PROMPT_TOKENS - len(ids)) + ids + [self.boi]

    def unconditional_ids(self) -> list[int]:
        """The empty prompt: padding only, then begin-image."""
        return [self.pad] * PROMPT_TOKENS + [self.boi]


def init_decoder(init: Path, vocab: int, layers: int | None = None) -> CodeLM:
    """A decoder with the init model's weights (its first `layers` layers) and new rows
    for the image tokens."""
    from safetensors.torch import load_file

    cfg = json.loads((init / "config.json").read_text())
    layers = layers or cfg["num_hidden_layers"]
    shape = ModelShape(vocab_size=vocab, hidden_size=cfg["hidden_size"],
                       num_layers=layers,
                       num_heads=cfg["num_attention_heads"],
                       num_kv_heads=cfg["num_key_value_heads"],
                       intermediate_size=cfg["intermediate_size"],
                       max_position_embeddings=PROMPT_TOKENS + 1 + VQ.grid ** 2 + 1,
                       rope_theta=cfg.get("rope_theta", 10000.0),
                       rms_norm_eps=cfg["rms_norm_eps"])
    model = CodeLM(shape)
    state = {k: v for k, v in load_file(str(init / "model.safetensors")).items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    emb = model.model.embed_tokens.weight.detach().clone()
    old = state.pop("model.embed_tokens.weight")
    emb[:old.shape[0]] = old
    state["model.embed_tokens.weight"] = emb
    model.load_state_dict(state)
    return model


def image_loss(model: CodeLM, x: torch.Tensor, codes: torch.Tensor, first: int,
               codebook: int) -> torch.Tensor:
    """Cross-entropy of the image codes, a softmax over the codebook's tokens only.
    x: (B, T) ids, T = PROMPT_TOKENS + 1 + grid^2 - 1 (the last code is never an input);
    codes: (B, grid^2) codebook indices."""
    T = x.shape[1]
    h = model.model.embed_tokens(x)
    cos, sin = model.cos[:T], model.sin[:T]
    for layer in model.model.layers:
        h = layer(h, cos, sin)
    h = model.model.norm(h[:, PROMPT_TOKENS:])  # (B, grid^2, hidden): BOI and codes
    logits = h @ model.model.embed_tokens.weight[first:first + codebook].t()  # (B, N, K)
    return F.cross_entropy(logits.reshape(-1, codebook).float(), codes.reshape(-1))


def lm_batch(layout: Layout, vq: VQModel, split: str, seeds: list[int],
             cond_drop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows and code targets for the scenes of `seeds`. With `cond_drop`, that share
    of the rows (chosen by seed) has its prompt replaced by padding: the unconditional
    model classifier-free guidance contrasts the prompt with."""
    scenes = [scene(split, s) for s in seeds]
    codes = vq.encode(to_pixels([s.image for s in scenes])).flatten(1)  # (B, grid^2)
    rows = []
    for seed, s, cs in zip(seeds, scenes, codes, strict=True):
        drop = cond_drop > 0 and random.Random(f"drop:{split}:{seed}").random() < cond_drop
        rows.append((layout.unconditional_ids() if drop else layout.prompt_ids(s.prompt))
                    + [layout.first + int(c) for c in cs[:-1]])
    return torch.tensor(rows), codes


def train_lm(args: argparse.Namespace) -> None:
    run: Path = args.run
    torch.manual_seed(args.seed)
    if not (run / "tokenizer" / "tokenizer.json").is_file():
        extend_tokenizer(args.init, run / "tokenizer", VQ.codebook_size)
    tok = Tokenizer.from_dir(run / "tokenizer")
    layout = Layout(tok, VQ.codebook_size, VQ.grid)
    vq = load_trained_vq(args.vq_run)
    lm_run = run / "lm"
    lm_run.mkdir(parents=True, exist_ok=True)
    model = init_decoder(args.init, tok.vocab_size, args.layers)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.05)
    state = load_checkpoint(lm_run, model, opt) or {
        "step": 0, "train_loss": [], "valid_loss": [], "seconds": 0.0,
        "args": {k: str(v) for k, v in vars(args).items()}}
    log.info("decoder: %.2fM parameters, vocab %d; resuming at step %d",
             model.num_parameters() / 1e6, tok.vocab_size, state["step"])
    vx, vc = lm_batch(layout, vq, "test", list(range(60_000, 60_000 + 32)))
    t_last, losses = time.time(), []
    while state["step"] < args.steps:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = args.lr * lr_at(step, args.steps, 1.0, args.warmup, 0.1)
        x, codes = lm_batch(layout, vq, "train",
                            [step * args.batch + i for i in range(args.batch)],
                            args.cond_drop)
        loss = image_loss(model, x, codes, layout.first, layout.codebook)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        state["step"] = step + 1
        if state["step"] % args.log_every == 0:
            dt, t_last = time.time() - t_last, time.time()
            state["seconds"] += dt
            avg = sum(losses) / len(losses)
            losses = []
            state["train_loss"].append([state["step"], avg])
            print(f"step {state['step']}/{args.steps} loss {avg:.4f} "
                  f"{args.batch * args.log_every / dt:.2f} images/s", file=sys.stderr,
                  flush=True)
        if state["step"] % args.save_every == 0 or state["step"] == args.steps:
            model.eval()
            with torch.no_grad():
                vl = float(image_loss(model, vx, vc, layout.first, layout.codebook))
            model.train()
            state["valid_loss"].append([state["step"], vl])
            print(f"step {state['step']} held-out loss {vl:.4f}", file=sys.stderr,
                  flush=True)
            save_checkpoint(lm_run, model, opt, state)
            plot_losses({"train": [tuple(q) for q in state["train_loss"]],
                         "valid": [tuple(q) for q in state["valid_loss"]]},
                        lm_run / "loss.png", "text-to-image decoder (image-code loss)")


# -- export -------------------------------------------------------------------------------

def export(run: Path, vq_run: Path, out: Path, guidance: float = 1.0) -> None:
    """Decoder + image tokenizer as one Hugging Face-style directory. `guidance`: the
    default classifier-free guidance scale (only for decoders trained with --cond-drop)."""
    from safetensors.torch import load_file, save_file

    tok_dir = run / "tokenizer"
    tok = Tokenizer.from_dir(tok_dir)
    layout = Layout(tok, VQ.codebook_size, VQ.grid)
    state = load_file(str(run / "lm" / "ckpt" / "model.safetensors"))
    lm_state = json.loads((run / "lm" / "ckpt" / "state.json").read_text())
    vq_state = json.loads((vq_run / "ckpt" / "state.json").read_text())
    cfg = json.loads((Path(lm_state["args"]["init"]) / "config.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    save_vq(load_trained_vq(vq_run), out)
    pad = layout.pad
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
    config = {
        **{k: v for k, v in cfg.items() if k != "torch_dtype"},
        "num_hidden_layers": layers,
        "vocab_size": tok.vocab_size,
        "max_position_embeddings": PROMPT_TOKENS + 1 + VQ.grid ** 2 + 1,
        "eos_token_id": layout.eoi, "pad_token_id": pad, "torch_dtype": "float32",
        "image_tokenizer": VQ.to_dict(),
        "image_generation": {
            "prompt_tokens": PROMPT_TOKENS, "pad_token_id": pad,
            "image_start_token_id": layout.boi, "image_end_token_id": layout.eoi,
            "first_code_token_id": layout.first, "codebook_size": VQ.codebook_size,
            "grid": VQ.grid, "image_size": VQ.image_size, "guidance_scale": guidance},
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": layout.eoi, "pad_token_id": pad, "do_sample": True,
         "temperature": SAMPLING["temperature"], "top_k": SAMPLING["top_k"], "top_p": 1.0},
        indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    from PIL import Image

    plots = [Image.open(p) for p in (vq_run / "loss.png", run / "lm" / "loss.png")
             if p.is_file()]
    if plots:
        sheet = Image.new("RGB", (plots[0].width, sum(p.height for p in plots)), "white")
        for i, p in enumerate(plots):
            sheet.paste(p, (0, i * plots[0].height))
        sheet.save(out / "loss.png")
    (out / "training.json").write_text(json.dumps({
        "vq": {"steps": vq_state["step"], "seconds": round(vq_state["seconds"]),
               "held_out_psnr_db": vq_state["psnr"][-1][1] if vq_state["psnr"] else None,
               "held_out_codes_used": vq_state["psnr"][-1][2] if vq_state["psnr"] else None,
               "reseeded": vq_state["reseeded"], "args": vq_state["args"]},
        "decoder": {"steps": lm_state["step"], "seconds": round(lm_state["seconds"]),
                    "held_out_loss": lm_state["valid_loss"][-1][1]
                    if lm_state["valid_loss"] else None, "args": lm_state["args"]},
    }, indent=1))


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("vq")
    v.add_argument("--run", type=Path, required=True)
    v.add_argument("--steps", type=int, default=1500)
    v.add_argument("--batch", type=int, default=24)
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--warmup", type=int, default=50)
    v.add_argument("--reseed-every", type=int, default=50)
    lm = sub.add_parser("lm")
    lm.add_argument("--run", type=Path, required=True)
    lm.add_argument("--vq-run", type=Path, required=True)
    lm.add_argument("--init", type=Path, default=DEFAULT_INIT)
    lm.add_argument("--layers", type=int, default=None,
                    help="keep the init model's first N layers (default: all)")
    lm.add_argument("--steps", type=int, default=2000)
    lm.add_argument("--batch", type=int, default=8)
    lm.add_argument("--lr", type=float, default=1e-3)
    lm.add_argument("--warmup", type=int, default=50)
    lm.add_argument("--cond-drop", type=float, default=0.0,
                    help="share of training rows whose prompt is dropped (padding only), "
                         "so the model also learns the unconditional distribution that "
                         "classifier-free guidance needs")
    for sp in (v, lm):
        sp.add_argument("--log-every", type=int, default=10)
        sp.add_argument("--save-every", type=int, default=100)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=int, default=1)
    e = sub.add_parser("export")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--vq-run", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--guidance", type=float, default=1.0,
                   help="default guidance scale written to config.json (1: off)")
    args = p.parse_args()
    if args.cmd == "export":
        export(args.run, args.vq_run, args.out, args.guidance)
        return
    torch.set_num_threads(args.threads)
    (train_vq if args.cmd == "vq" else train_lm)(args)


if __name__ == "__main__":
    main()
