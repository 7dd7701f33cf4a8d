"""The training recipe of the default vision model: LLaVA-shaped, from generated images.

    python -m codevista.models.train.vlm train --run DIR [--init models/default/code]
        [--steps N] [--batch B] [--compile] [--device cpu|cuda]
    python -m codevista.models.train.vlm export --run DIR --out models/default/vlm

A small SigLIP-style tower (no class token) and a two-layer GELU projector feed the
embedded code model's decoder, which is loaded as the starting point, so the vision model
shares the code tokenizer and its `<|image|>` token. Every sample is drawn by vlm_data.py
from a seed that is a function of (step, index): a resumed run sees the same data. The
prompt is `formats.vision_prompt(formats.vision_question(task, question))`, exactly what
the server sends; the loss covers the answer and its end-of-text token only.

`--ocr-rate R` puts simulated OCR lines (from the drawn text, with OCR-like noise) in the
prompt of that share of diagrams, as the server gives real OCR lines; `--novel-words R`
labels that share of training flowcharts with made-up words, which the model can only get
right by copying them from the OCR lines (the held-out words stay unseen either way).
`--restart STEP` continues a finished run with a new warm-up and cosine schedule.

Checkpoints (safetensors weights and optimizer state, JSON state) every --save-every
steps; resume after any interruption; a loss plot at every checkpoint. `export` writes the
Hugging Face Llava layout that both codevista and transformers load.
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
from torch import nn

from .. import formats
from ..tokenizer import Tokenizer
from ..vision.image import ImageProcessor
from ..vision.tower import Projector, VisionConfig, VisionTower
from .model import CodeLM, ModelShape
from .plot import plot_losses
from .train import checked_restart, load_checkpoint, lr_at, save_checkpoint
from .vlm_data import IMAGE_SIZE, sample, shapes, simulated_ocr

# the kinds a scene of shapes answers
SCENE_KINDS = frozenset({"count", "color", "shape", "locate", "describe"})

log = logging.getLogger("codevista.train.vlm")
PLACEHOLDER = -2
SEQ_LEN = 232
PREPROCESSOR = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 3,
                "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                "do_convert_rgb": True}
VISION = dict(model_type="siglip_vision_model", hidden_size=192, intermediate_size=768,
              num_hidden_layers=4, num_attention_heads=4, image_size=IMAGE_SIZE,
              patch_size=16, num_channels=3, hidden_act="gelu_pytorch_tanh",
              layer_norm_eps=1e-6)


class TrainVLM(nn.Module):
    """Parameter names are the Llava checkpoint's (tied LM head, so none for it)."""

    def __init__(self, vision: VisionConfig, shape: ModelShape) -> None:
        super().__init__()
        self.vision_tower = VisionTower(vision)
        self.multi_modal_projector = Projector(vision.hidden_size, shape.hidden_size, "gelu",
                                               True)
        self.language_model = CodeLM(shape)
        for m in list(self.vision_tower.modules()) + list(self.multi_modal_projector.modules()):
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.vision_tower.embeddings.position_embedding.weight, std=0.02)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, targets: torch.Tensor
                ) -> torch.Tensor:
        feats = self.multi_modal_projector(self.vision_tower(pixels)[-1])  # (B, P, H)
        mask = ids == PLACEHOLDER
        x = self.language_model.model.embed_tokens(ids.clamp(min=0))
        x = x.masked_scatter(mask.unsqueeze(-1), feats.to(x.dtype))
        return self.language_model(ids.clamp(min=0), targets, embeds=x)[1]


class Batcher:
    def __init__(self, tok: Tokenizer, tokens_per_image: int, ocr_rate: float = 0.0,
                 ocr_tasks: tuple[str, ...] = ("describe-diagram",),
                 novel_words: float = 0.0, diagram_share: float = 0.0,
                 scene_share: float = 0.0) -> None:
        self.tok = tok
        self.novel_words = novel_words  # share of train diagrams with made-up labels
        # at least this share of each train batch is flowcharts (0: the generators' mix)
        self.diagram_share = diagram_share
        # that share of the other train samples becomes a scene of shapes (a continuation
        # for counting, colour, shape and grounding); drawn before diagram_share
        self.scene_share = scene_share
        # share of samples (of the tasks named) whose prompt carries OCR lines, simulated
        # from the drawn text; their sequences are longer
        self.ocr_rate = ocr_rate
        self.ocr_tasks = ocr_tasks
        self.seq_len = SEQ_LEN + (48 if ocr_rate > 0 else 0)
        self.proc = ImageProcessor.from_dict(PREPROCESSOR, IMAGE_SIZE)
        self.eot = tok.token_to_id(formats.EOT)
        self.image_id = tok.token_to_id(formats.IMAGE)
        self.p = tokens_per_image
        assert self.eot is not None and self.image_id is not None

    def encode(self, task: str, question: str | None, answer: str | None, ocr: str = ""
               ) -> tuple[list[int], int]:
        """(ids with the image expanded to placeholders, length of the prompt part)."""
        prompt = formats.vision_prompt(formats.vision_question(task, question), ocr=ocr)
        ids: list[int] = []
        for t in self.tok.encode(prompt, add_special_tokens=False):
            ids.extend([PLACEHOLDER] * self.p if t == self.image_id else [t])
        n = len(ids)
        if answer is not None:
            ids += self.tok.encode(answer, add_special_tokens=False) + [self.eot]
        return ids, n

    def draw(self, split: str, seed: int):
        if split != "train":
            return sample(split, seed)
        s = sample(split, seed, self.novel_words)
        if (self.scene_share > 0 and s.kind not in SCENE_KINDS
                and random.Random(seed * 37 + 11).random() < self.scene_share):
            # a scene from its own namespace of seeds, never a held-out one
            return shapes(random.Random(f"train-scene:{seed}"), split)
        if s.kind != "diagram" and random.Random(seed * 31 + 5).random() < self.diagram_share:
            # the first flowchart among this seed's own block of seeds (disjoint per seed)
            for k in range(1, 200):
                t = sample(split, 10_000_000 + seed * 200 + k, self.novel_words)
                if t.kind == "diagram":
                    return t
        return s

    def batch(self, split: str, seeds: list[int]) -> tuple[torch.Tensor, ...]:
        pixels, inputs, targets = [], [], []
        for seed in seeds:
            s = self.draw(split, seed)
            ocr = ""
            if self.ocr_rate > 0 and s.task in self.ocr_tasks:
                rng = random.Random(seed * 7919 + 17)
                if rng.random() < self.ocr_rate:
                    ocr = formats.ocr_context(simulated_ocr(s, rng))
            ids, n = self.encode(s.task, s.question, s.answer, ocr)
            ids = ids[:self.seq_len + 1]
            x, y = ids[:-1], ids[1:]
            y = [-1] * (n - 1) + y[n - 1:]
            pad = self.seq_len - len(x)
            inputs.append(x + [self.eot] * pad)
            targets.append(y + [-1] * pad)
            pixels.append(self.proc(s.image))
        return (torch.stack(pixels), torch.tensor(inputs), torch.tensor(targets))


def shape_of(init: Path) -> ModelShape:
    cfg = json.loads((init / "config.json").read_text())
    return ModelShape(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                      num_layers=cfg["num_hidden_layers"],
                      num_heads=cfg["num_attention_heads"],
                      num_kv_heads=cfg["num_key_value_heads"],
                      intermediate_size=cfg["intermediate_size"],
                      max_position_embeddings=cfg["max_position_embeddings"],
                      rope_theta=cfg.get("rope_theta", 10000.0),
                      rms_norm_eps=cfg["rms_norm_eps"])


def build(run: Path, init: Path) -> tuple[TrainVLM, Tokenizer]:
    from safetensors.torch import load_file

    run.mkdir(parents=True, exist_ok=True)
    if not (run / "tokenizer").is_dir():
        (run / "tokenizer").mkdir()
        for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
            shutil.copy(init / name, run / "tokenizer" / name)
    tok = Tokenizer.from_dir(run / "tokenizer")
    model = TrainVLM(VisionConfig.from_hf(VISION), shape_of(run / "tokenizer"))
    if not (run / "ckpt" / "state.json").is_file():
        model.language_model.load_state_dict(load_file(str(init / "model.safetensors")))
    return model, tok


def train(args: argparse.Namespace) -> None:
    run: Path = args.run
    torch.manual_seed(args.seed)
    model, tok = build(run, args.init)
    model.to(args.device)
    lm = list(model.language_model.parameters())
    lm_ids = {id(p) for p in lm}
    new = [p for p in model.parameters() if id(p) not in lm_ids]
    opt = torch.optim.AdamW([{"params": new, "lr": args.lr},
                             {"params": lm, "lr": args.lr * args.lm_lr_scale}],
                            betas=(0.9, 0.95), weight_decay=0.05)
    state = load_checkpoint(run, model, opt) or {
        "step": 0, "train_loss": [], "valid_loss": [], "seconds": 0.0,
        "args": {k: str(v) for k, v in vars(args).items()}, "device": args.device}
    batcher = Batcher(tok, model.vision_tower.cfg.num_patches, args.ocr_rate,
                      novel_words=args.novel_words, diagram_share=args.diagram_share,
                      scene_share=args.scene_share)
    step_fn = torch.compile(model) if args.compile else model
    log.info("VLM: %.2fM parameters (%.2fM new); resuming at step %d",
             sum(p.numel() for p in model.parameters()) / 1e6,
             sum(p.numel() for p in new) / 1e6, state["step"])
    restart = checked_restart(args)
    t_last, losses = time.time(), []
    while state["step"] < args.steps:
        step = state["step"]
        scale = lr_at(step, args.steps, 1.0, args.warmup, 0.1, restart)
        opt.param_groups[0]["lr"] = args.lr * scale
        opt.param_groups[1]["lr"] = args.lr * args.lm_lr_scale * scale
        seeds = [step * args.batch + i for i in range(args.batch)]
        pixels, x, y = (t.to(args.device) for t in batcher.batch("train", seeds))
        loss = step_fn(pixels, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.detach().item())
        state["step"] = step + 1
        if state["step"] % args.log_every == 0:
            dt = time.time() - t_last
            t_last = time.time()
            state["seconds"] += dt
            avg = sum(losses) / len(losses)
            losses = []
            state["train_loss"].append([state["step"], avg])
            print(f"step {state['step']}/{args.steps} loss {avg:.3f} "
                  f"{args.batch * args.log_every / dt:.1f} samples/s", file=sys.stderr,
                  flush=True)
        if state["step"] % args.save_every == 0 or state["step"] == args.steps:
            model.eval()
            with torch.no_grad():
                vp, vx, vy = (t.to(args.device) for t in batcher.batch(
                    "test", list(range(10_000, 10_000 + 64))))
                vl = float(model(vp, vx, vy))
            model.train()
            state["valid_loss"].append([state["step"], vl])
            print(f"step {state['step']} held-out loss {vl:.3f}", file=sys.stderr, flush=True)
            save_checkpoint(run, model, opt, state)
            plot_losses({"train": [tuple(p) for p in state["train_loss"]],
                         "held-out": [tuple(p) for p in state["valid_loss"]]},
                        run / "loss.png", "default VLM")


def export(run: Path, out: Path, ocr_copy_bias: float = 0.0) -> None:
    """The last checkpoint as a Hugging Face Llava checkpoint directory. `ocr_copy_bias`
    (for a model trained to copy labels from OCR lines) goes into config.json, where the
    server reads it for `describe-diagram` (server/features/vision.py)."""
    from safetensors.torch import load_file, save_file

    tok_dir = run / "tokenizer"
    text = json.loads((tok_dir / "config.json").read_text())
    state = load_file(str(run / "ckpt" / "model.safetensors"))
    vision = VisionConfig.from_hf(VISION)
    state["vision_tower.post_layernorm.weight"] = torch.ones(vision.hidden_size)
    state["vision_tower.post_layernorm.bias"] = torch.zeros(vision.hidden_size)
    tok = Tokenizer.from_dir(tok_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    eos = tok.token_to_id(formats.EOT)
    text_config = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")}
    config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": tok.token_to_id(formats.IMAGE),
        "image_seq_length": vision.num_patches, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True, "tie_word_embeddings": True,
        "text_config": text_config,
        "vision_config": {**VISION, "vision_use_head": False},
    }
    if ocr_copy_bias > 0:
        config["ocr_copy_bias"] = ocr_copy_bias
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": eos, "pad_token_id": eos, "do_sample": False}, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    if (run / "loss.png").is_file():
        shutil.copy(run / "loss.png", out / "loss.png")
    st = json.loads((run / "ckpt" / "state.json").read_text())
    (out / "training.json").write_text(json.dumps(
        {k: st[k] for k in ("step", "seconds", "device", "args")} |
        {"final_held_out_loss": st["valid_loss"][-1][1] if st["valid_loss"] else None},
        indent=1))


def main() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--run", type=Path, required=True)
    t.add_argument("--init", type=Path, default=Path(__file__).resolve().parents[1] /
                   "default" / "code")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--lm-lr-scale", type=float, default=0.5)
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--compile", action="store_true")
    t.add_argument("--ocr-rate", type=float, default=0.0,
                   help="share of samples trained with simulated OCR lines in the prompt")
    t.add_argument("--novel-words", type=float, default=0.0,
                   help="share of train diagrams labelled with made-up words, so that the "
                        "labels must be copied from the OCR lines rather than memorised")
    t.add_argument("--restart", type=int, default=None,
                   help="start a new warm-up and cosine schedule at this step (a "
                        "continued run)")
    t.add_argument("--diagram-share", type=float, default=0.0,
                   help="turn that share of the other samples into flowcharts (a "
                        "diagram-reading continuation)")
    t.add_argument("--scene-share", type=float, default=0.0,
                   help="turn that share of the other samples into scenes of shapes (a "
                        "counting and grounding continuation)")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e = sub.add_parser("export")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--ocr-copy-bias", type=float, default=0.0,
                   help="logit bias the server puts on OCR tokens for describe-diagram")
    args = p.parse_args()
    if args.cmd == "train":
        train(args)
    else:
        export(args.run, args.out, args.ocr_copy_bias)


if __name__ == "__main__":
    main()
