"""Faithfulness and speed of the text-to-image model on held-out prompts.

    python benchmarks/t2i_quality.py [--model models/default/t2i] [--shapes 60]
        [--flowcharts 20] [--charts 20] [--seed 0] [--top-k 0] [--vlm] [--out r.json]

Held-out prompts are those of models/train/t2i_data.py's test split: shape and chart
prompts whose hash puts them in the held-out bucket (never drawn in training) and
flowcharts labelled with the held-out words. Each prompt is generated once (sampling
seed --seed) and graded by plain image analysis (`t2i_data.grade`: connected components
of each palette colour): count, colour and layout (cell of each shape; the filled box's
place in a flowchart; each bar's height within one unit), and for shapes the shape.
The same checks on the real pictures encoded and decoded by the VQ tokenizer give the
ceiling the decoder could reach; PSNR and the share of the codebook those encodings use
describe the tokenizer. Speed: the time to generate one image (grid x grid tokens, KV
cache, the engine's one-thread decode) and, for comparison, the same tokens recomputed
from scratch at every step (no cache). With --vlm the default vision model is asked how
many shapes each generated (and each real) shape picture holds.

Prints one JSON line per section; --out writes them all as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def emit(record: dict[str, Any], into: dict[str, Any]) -> None:
    into[record["section"]] = record
    print(json.dumps(record), flush=True)


def shares(rows: list[dict[str, bool]]) -> dict[str, float]:
    keys = sorted(set.intersection(*(set(r) for r in rows)))  # checks every row has
    out = {k: round(sum(r[k] for r in rows) / len(rows), 3) for k in keys}
    out["count_and_color"] = round(sum(r["count"] and r["color"] for r in rows) / len(rows), 3)
    out["all"] = round(sum(all(r.values()) for r in rows) / len(rows), 3)  # its own checks
    out["n"] = len(rows)
    return out


def uncached_seconds(model, prompt_ids: list[int], codes: list[int]) -> float:
    """Greedy-equivalent cost without a KV cache: a full forward for every new token."""
    from codevista.models.kv_cache import KVCache

    m, cfg = model.loaded.model, model.loaded.config
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(len(codes)):
            seq = torch.tensor(prompt_ids + codes[:i])
            cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(seq),
                            m.dtype)
            m(seq, cache, 0)
    return time.perf_counter() - t0


def vlm_counts(images: list[Any]) -> list[int | None]:
    """The default VLM's answer to "How many shapes are there?" for each image."""
    from codevista.models import formats
    from codevista.models.engine import Engine, SamplingParams
    from codevista.models.loader import DEFAULT_VLM_DIR, load_model
    from PIL import Image

    loaded = load_model(DEFAULT_VLM_DIR)
    out: list[int | None] = []
    with Engine(loaded) as engine:
        prompt = formats.vision_prompt(formats.vision_question(
            "explain", "How many shapes are there?"))
        ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
        for img in images:
            big = img.resize((160, 160), Image.Resampling.BICUBIC)
            r = engine.generate(ids, SamplingParams(max_new_tokens=4),
                                images=[loaded.vision.preprocess(big)])
            text = r.text.strip().split()
            out.append(int(text[0].strip(".")) if text and text[0].strip(".").isdigit()
                       else None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "t2i")
    p.add_argument("--shapes", type=int, default=60)
    p.add_argument("--flowcharts", type=int, default=20)
    p.add_argument("--charts", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--temperature", type=float, default=None,
                   help="default: the checkpoint's generation_config.json")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1: off; default: the checkpoint's)")
    p.add_argument("--timing-runs", type=int, default=5)
    p.add_argument("--vlm", action="store_true")
    p.add_argument("--samples", type=Path, default=None,
                   help="write a sheet of generated (top) and reconstructed (bottom) images")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from codevista.models.train.t2i_data import grade, scene
    from codevista.models.vision.t2i import TextToImage
    from codevista.models.vision.vq import psnr, to_images, to_pixels

    results: dict[str, Any] = {}
    model = TextToImage.load(args.model, warmup=True)
    K = model.layout.codebook_size
    plan = [("shapes", args.shapes), ("flowchart", args.flowcharts), ("chart", args.charts)]
    scenes = [scene("test", 900_000 + i, kind) for kind, n in plan for i in range(n)]

    # -- the tokenizer's ceiling ----------------------------------------------------------
    real = to_pixels([s.image for s in scenes])
    with torch.inference_mode():
        codes = model.vq.encode(real)
        rec = model.vq.decode(codes)
    rec_images = to_images(rec)
    ceiling: dict[str, list[dict[str, bool]]] = defaultdict(list)
    for s, im in zip(scenes, rec_images, strict=True):
        ceiling[s.kind].append(grade(s, im))
    emit({"section": "tokenizer", "psnr_db": round(psnr(rec, real), 2),
          "codes_used": round(len(torch.unique(codes)) / K, 3), "codebook": K,
          "grid": model.layout.grid, "images": len(scenes),
          **{f"ceiling_{k}": shares(v) for k, v in ceiling.items()},
          "ceiling_all_kinds": shares([r for v in ceiling.values() for r in v])}, results)

    # -- generation -----------------------------------------------------------------------
    got: dict[str, list[dict[str, bool]]] = defaultdict(list)
    generated, seconds, used = [], [], set()
    for s in scenes:
        g = model.generate(s.prompt, seed=args.seed, top_k=args.top_k,
                           temperature=args.temperature, guidance=args.guidance)
        got[s.kind].append(grade(s, g.image))
        generated.append(g.image)
        seconds.append(g.result.total_s)
        used.update(g.codes.flatten().tolist())
    sp = model.params(args.seed, args.temperature, args.top_k, guidance=args.guidance)
    emit({"section": "generation", "seed": args.seed, "top_k": sp.top_k,
          "temperature": sp.temperature, "guidance": sp.guidance_scale,
          **{k: shares(v) for k, v in got.items()},
          "all_kinds": shares([r for v in got.values() for r in v]),
          "codes_used": round(len(used) / K, 3),
          "median_s_per_image": round(statistics.median(seconds), 3)}, results)

    # -- speed ----------------------------------------------------------------------------
    prompt = scenes[0].prompt
    times = []
    for i in range(args.timing_runs):
        t0 = time.perf_counter()
        g = model.generate(prompt, seed=i, guidance=args.guidance)
        times.append(time.perf_counter() - t0)
    ids = model.prompt_ids(prompt)
    toks = [int(t) for t in g.result.token_ids]
    no_cache = uncached_seconds(model, ids, toks)
    emit({"section": "speed", "image_tokens": model.layout.tokens,
          "prompt_tokens": len(ids), "threads": model.engine.num_threads,
          "kv_cache_s_median": round(statistics.median(times), 3),
          "kv_cache_s_max": round(max(times), 3),
          "tokens_per_s": round(model.layout.tokens / statistics.median(times), 1),
          "no_cache_s": round(no_cache, 3)}, results)
    model.close()

    if args.vlm:
        shape_scenes = [(i, s) for i, s in enumerate(scenes) if s.kind == "shapes"]
        want = [len(s.meta["objects"]) for _, s in shape_scenes]
        gen_counts = vlm_counts([generated[i] for i, _ in shape_scenes])
        real_counts = vlm_counts([s.image for _, s in shape_scenes])
        emit({"section": "vlm_count", "n": len(want),
              "generated": round(sum(a == b for a, b in zip(gen_counts, want, strict=True))
                                 / len(want), 3),
              "real_pictures": round(sum(a == b for a, b in zip(real_counts, want,
                                                                 strict=True)) / len(want),
                                     3)}, results)

    if args.samples is not None:
        from PIL import Image

        n = min(16, len(scenes))
        picks = list(range(0, len(scenes), max(1, len(scenes) // n)))[:n]
        sheet = Image.new("RGB", (64 * n, 128), "white")
        for j, i in enumerate(picks):
            sheet.paste(generated[i].resize((64, 64)), (64 * j, 0))
            sheet.paste(rec_images[i].resize((64, 64)), (64 * j, 64))
        sheet.save(args.samples)
        print(json.dumps({"section": "samples", "prompts": [scenes[i].prompt
                                                           for i in picks]}), file=sys.stderr)
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
