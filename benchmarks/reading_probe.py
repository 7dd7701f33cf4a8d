"""How fast the default VLM's vision tower learns to read: the tower (from a VLM checkpoint)
and a linear per-patch reading head trained alone on reading pictures
(models/train/read_data.py), printing the share of held-out characters the head names.

    python benchmarks/reading_probe.py --steps 300            # slots in reading order
    python benchmarks/reading_probe.py --steps 300 --slots place
    python benchmarks/reading_probe.py --patch 8              # the tower resized, 400 patches
    python benchmarks/reading_probe.py --fresh --patch 8      # a new tower, 400 patches

`--slots order`: each patch's characters in reading order (read_data.patch_targets, what
`vlm.py train --read-weight` trains). `--slots place`: one slot per 4 x 8 px cell of the
patch (4 columns, 2 rows), the character whose centre lies there. `--patch 8` reads with 8 px
patches (400 of them), the checkpoint's tower resized to them (vlm.resize_tower); `--fresh`
starts from a randomly initialised tower instead, `--layers` setting its depth. The tower's weights
are not saved: this measures the learning curve, nothing more.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def place_targets(chars: list[tuple[str, float, float]]) -> list[list[int]]:
    """One slot per 4 x 8 px cell of each patch: the first character centred there."""
    from codevista.models.train.read_data import GRID, NO_CHAR, PATCH, char_class

    out = [[NO_CHAR] * 8 for _ in range(GRID * GRID)]
    for c, x, y in chars:
        k = char_class(c)
        if k == NO_CHAR:
            continue
        cell = int(y) // PATCH * GRID + int(x) // PATCH
        sub = (int(y) % PATCH) // 8 * 4 + (int(x) % PATCH) // 4
        if out[cell][sub] == NO_CHAR:
            out[cell][sub] = k
    return out


def main() -> int:
    from codevista.models.train.read_data import CHARSET, patch_targets, reading, slots_for
    from codevista.models.train.vlm import PREPROCESSOR, VISION, resize_tower, slot_loss
    from codevista.models.train.vlm_data import IMAGE_SIZE
    from codevista.models.vision.image import ImageProcessor
    from codevista.models.vision.tower import VisionConfig, VisionTower
    from safetensors.torch import load_file

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "vlm")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--slots", choices=("order", "place"), default="order")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="a randomly initialised tower")
    p.add_argument("--patch", type=int, default=16, help="patch size (a divisor of 16)")
    p.add_argument("--layers", type=int, default=0, help="tower layers (with --fresh)")
    p.add_argument("--warmup", type=int, default=0, help="steps of linear warm-up")
    p.add_argument("--held", type=int, default=200, help="held-out reading pictures")
    args = p.parse_args()
    if not args.fresh and args.layers:
        p.error("--layers needs --fresh")
    if args.slots == "place" and args.patch != 16:
        p.error("--slots place is for 16 px patches")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    slot_count = slots_for(args.patch)
    if args.slots == "order":
        def targets_of(chars):
            return patch_targets(chars, args.patch, slot_count)
    else:
        targets_of = place_targets
    proc = ImageProcessor.from_dict(PREPROCESSOR, IMAGE_SIZE)
    shape = dict(VISION, patch_size=args.patch)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    tower = VisionTower(VisionConfig.from_hf(shape))
    if not args.fresh:
        weights = resize_tower(load_file(str(args.model / "model.safetensors")), args.patch)
        tower.load_state_dict({k.removeprefix("vision_tower."): v for k, v in weights.items()
                               if k.startswith("vision_tower.") and "post_layernorm" not in k})
    if args.fresh:
        tag = f"fresh p{args.patch} x{tower.cfg.num_layers}"
    else:
        tag = "checkpoint" + (f" resized to p{args.patch}" if args.patch != 16 else "")
    tag += f", slots by {args.slots}"
    classes = len(CHARSET) + 1

    def batch(split: str, seeds: range) -> tuple[torch.Tensor, torch.Tensor]:
        read = [reading(random.Random(f"probe-{split}:{s}"), split) for s in seeds]
        return (torch.stack([proc(r.image) for r in read]),
                torch.tensor([targets_of(r.chars) for r in read]))

    held_px, held_t = batch("test", range(args.held))
    slots = held_t.shape[-1]
    head = torch.nn.Linear(tower.cfg.hidden_size, slots * classes)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / args.warmup) if args.warmup else 1.0)

    def accuracy() -> float:
        tower.eval()
        with torch.no_grad():
            pred = head(tower(held_px)[-1]).view(*held_t.shape, classes).argmax(-1)
        tower.train()
        char = held_t > 0
        return float((pred[char] == held_t[char]).float().mean())

    print(f"{tag}: step 0, 0 pictures: {100 * accuracy():.1f} % of held-out "
          "characters", flush=True)
    t = time.time()
    for step in range(1, args.steps + 1):
        px, y = batch("train", range(step * args.batch, (step + 1) * args.batch))
        loss = slot_loss(head(tower(px)[-1]).view(*y.shape, classes), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % args.every == 0 or step == args.steps:
            print(f"{tag}: step {step}, {step * args.batch} pictures: "
                  f"{100 * accuracy():.1f} % of held-out characters ({time.time() - t:.0f} s)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
