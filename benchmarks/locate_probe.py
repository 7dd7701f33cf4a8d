"""Why a vision model misses in `locate`: where its boxes go wrong, and where in the decoder
the named object's position is (or is not) known. On the held-out scenes of
models/train/vlm_data (the `locate` questions `vision_quality.py` scores).

    python benchmarks/locate_probe.py [--model models/default/vlm] [--samples 100]
        [--probe 400] [--attention 60] [--out results.json]

Four groups, each one JSON line on stdout:

boxes       greedy answers as the server asks: IoU >= 0.5 (the vision_quality metric),
            per coordinate the median absolute error (0-1000 units) and the share within
            40, and how many answers share the most common first coordinate (a model that
            does not know where the object is falls back on a favourite value)
transposed  the same pictures and questions with the image transposed (x and y swapped)
            and the gold box with them: if the model reads the second coordinate well in
            both, the tower encodes both axes and the weakness is in the first coordinate
            (or the first number written), not in one axis of the picture
probe       ridge regressions (5-fold cross-validated R^2) from the decoder's hidden state,
            layer by layer, to the target's x1 and y1, at three places: the position that
            writes the first number (after "["); after the gold first coordinate
            ("[x1,"); after a wrong one ("[x1 + 500 mod 1000,"). High R^2 for y1 after the
            gold x1 and low after the wrong one means the model finds "the object at the x
            it has written", not "the object it was asked for". Hidden states come from
            `transformers`' LlavaForConditionalGeneration on the same checkpoint (the
            reference the parity tests compare codevista with).
attention   per decoder layer, the head that attends most to the named object's patches,
            relative to the other objects' patches (the median over pictures of the ratio
            per patch; 1: no preference), at the position that writes x1, the one that
            writes y1 after the gold x1, and, for contrast, the answer of "What colour is
            the square?". A model that finds the named object before its first number
            has a head well above 1 at the first place.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vision_quality import held_out, iou  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def held_out_locates(n: int) -> list[Any]:
    return list(held_out(n, ("locate",)))


def transposed(s: Any) -> tuple[Any, list[int]]:
    from PIL import Image

    b = s.meta["box"]
    return s.image.transpose(Image.Transpose.TRANSPOSE), [b[1], b[0], b[3], b[2]]


def box_errors(pairs: list[tuple[list[int] | None, list[int]]]) -> dict[str, Any]:
    got = [(p, g) for p, g in pairs if p is not None]
    out: dict[str, Any] = {
        "n": len(pairs), "answered_with_a_box": len(got),
        "iou_0.5": round(100 * sum(iou(p, g) >= 0.5 for p, g in got) / max(1, len(pairs)), 1)}
    if got:
        pred, gold = np.array([p for p, _ in got]), np.array([g for _, g in got])
        for i, name in enumerate(("x1", "y1", "x2", "y2")):
            err = np.abs(pred[:, i] - gold[:, i])
            out[name] = {"median_abs_error": float(np.median(err)),
                         "within_40": round(100 * float((err <= 40).mean()), 1)}
        value, count = Counter(pred[:, 0].tolist()).most_common(1)[0]
        out["most_common_x1"] = {"value": int(value), "share": round(100 * count / len(got), 1)}
    return out


def answers(loaded: Any, samples: list[Any]) -> dict[str, Any]:
    from codevista.models import formats
    from codevista.models.engine import Engine, SamplingParams
    from codevista.server.vision import parse_boxes

    vision = loaded.vision
    image_tok = loaded.tokenizer.tok.id_to_token(vision.image_token_id)
    plain, flipped = [], []
    with Engine(loaded) as engine:
        for s in samples:
            prompt = formats.vision_prompt(formats.vision_question(s.task, s.question),
                                           image_tok)
            ids = loaded.tokenizer.encode(prompt, add_special_tokens=False)
            for image, gold, into in ((s.image, s.meta["box"], plain),
                                      (*transposed(s), flipped)):
                out = engine.generate(ids, SamplingParams(max_new_tokens=32),
                                      images=[vision.preprocess(image)]).text
                boxes = parse_boxes(out)
                into.append((boxes[0] if boxes else None, gold))
    return {"boxes": box_errors(plain), "transposed": box_errors(flipped)}


def cv_r2(features: np.ndarray, target: np.ndarray, folds: int = 5, lam: float = 10.0
          ) -> float:
    pred = np.zeros_like(target)
    idx = np.arange(len(target))
    for f in range(folds):
        test = idx % folds == f
        a, t = features[~test], target[~test]
        mu, tm = a.mean(0), t.mean()
        a = a - mu
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (t - tm))
        pred[test] = (features[test] - mu) @ w + tm
    return round(float(1 - ((pred - target) ** 2).mean() / target.var()), 3)


def expanded_ids(loaded: Any, text: str) -> list[int]:
    """The prompt's ids with the image token repeated once per patch (as transformers'
    Llava takes them)."""
    image_id = loaded.vision.image_token_id
    return [i for t in loaded.tokenizer.encode(text, add_special_tokens=False)
            for i in ([t] * loaded.vision.tokens_per_image if t == image_id else [t])]


def probe(model_dir: Path, loaded: Any, samples: list[Any]) -> dict[str, Any]:
    from codevista.models import formats
    from transformers import LlavaForConditionalGeneration

    vision = loaded.vision
    image_id = vision.image_token_id
    image_tok = loaded.tokenizer.tok.id_to_token(image_id)
    hf = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    places = {"before_x1": lambda b: "[", "after_gold_x1": lambda b: f"[{b[0]},",
              "after_wrong_x1": lambda b: f"[{(b[0] + 500) % 1000},"}
    hidden: dict[str, dict[int, list[np.ndarray]]] = {k: {} for k in places}
    for s in samples:
        question = formats.vision_question(s.task, s.question)
        pixels = torch.tensor(np.asarray(vision.preprocess(s.image)))[None]
        for place, suffix in places.items():
            text = formats.vision_prompt(question, image_tok) + suffix(s.meta["box"])
            ids = expanded_ids(loaded, text)
            with torch.no_grad():
                out = hf(input_ids=torch.tensor([ids]), pixel_values=pixels,
                         output_hidden_states=True)
            for layer, h in enumerate(out.hidden_states):
                hidden[place].setdefault(layer, []).append(h[0, -1].float().numpy())
    gold = np.array([s.meta["box"] for s in samples], dtype=float)
    return {place: {f"layer_{layer}": {"x1_r2": cv_r2(np.array(h), gold[:, 0]),
                                       "y1_r2": cv_r2(np.array(h), gold[:, 1])}
                    for layer, h in layers.items()}
            for place, layers in hidden.items()}


def object_patches(s: Any, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(target, other) boolean masks over the grid x grid patches: the patches where the
    object in s.meta["box"] covers over 5 % of the pixels, and those where other objects
    do (and the target does not). Object pixels are those unlike the background (the
    canvas colour at a corner)."""
    img = np.asarray(s.image.convert("RGB")).astype(int)
    size = img.shape[0]
    drawn = np.abs(img - img[2, 2]).sum(-1) > 40
    x1, y1, x2, y2 = (round(v * size / 1000) for v in s.meta["box"])
    target = np.zeros_like(drawn)
    target[y1:y2 + 1, x1:x2 + 1] = True
    target &= drawn
    ps = size // grid

    def share(mask: np.ndarray) -> np.ndarray:
        return mask[:grid * ps, :grid * ps].reshape(grid, ps, grid, ps).mean((1, 3)).ravel()

    t = share(target) > 0.05
    return t, (share(drawn & ~target) > 0.05) & ~t


def attention(model_dir: Path, loaded: Any, n: int) -> dict[str, Any]:
    """Per layer, the decoder head that attends most to the named object: the median over
    pictures of its attention per target patch over its attention per patch of the other
    objects (1: no preference), at the position that writes x1, the one that writes y1
    after the gold x1, and (for contrast) the answer of "What colour is the square?"."""
    from codevista.models import formats
    from transformers import LlavaForConditionalGeneration

    vision = loaded.vision
    image_id = vision.image_token_id
    image_tok = loaded.tokenizer.tok.id_to_token(image_id)
    patches = vision.tokens_per_image
    grid = int(round(patches ** 0.5))
    hf = LlavaForConditionalGeneration.from_pretrained(model_dir,
                                                       attn_implementation="eager").eval()
    places = (("writes_x1", "locate", lambda b: "["),
              ("writes_y1_after_gold_x1", "locate", lambda b: f"[{b[0]},"),
              ("colour_answer", "color", lambda b: ""))
    out: dict[str, Any] = {}
    for place, kind, suffix in places:
        ratios = []  # (pictures, layers, heads)
        for s in held_out(n, (kind,)):
            target, other = object_patches(s, grid)
            if not target.any() or not other.any():
                continue  # nothing to prefer it over
            text = formats.vision_prompt(formats.vision_question(s.task, s.question),
                                         image_tok) + suffix(s.meta["box"])
            ids = expanded_ids(loaded, text)
            start = ids.index(image_id)
            pixels = torch.tensor(np.asarray(vision.preprocess(s.image)))[None]
            with torch.no_grad():
                att = hf(input_ids=torch.tensor([ids]), pixel_values=pixels,
                         output_attentions=True).attentions
            per = []
            for a in att:  # (1, heads, T, T): the last position's row over the patches
                row = a[0, :, -1, start:start + patches].float().numpy()
                per.append(row[:, target].mean(1) / np.maximum(row[:, other].mean(1), 1e-12))
            ratios.append(per)
        med = np.median(np.array(ratios), axis=0)
        out[place] = {"pictures": len(ratios), **{
            f"layer_{layer}": {"head": int(h.argmax()), "target_vs_other": round(float(h.max()), 2)}
            for layer, h in enumerate(med)}}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "vlm")
    p.add_argument("--samples", type=int, default=100, help="pictures answered (greedy)")
    p.add_argument("--probe", type=int, default=400,
                   help="pictures whose hidden states are probed (0: no probe)")
    p.add_argument("--attention", type=int, default=60,
                   help="pictures per place whose attention is measured (0: none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from codevista.models.loader import load_model

    loaded = load_model(args.model)
    if loaded.vision is None:
        raise SystemExit(f"{args.model} is not a vision model")
    result: dict[str, Any] = {"model": str(args.model)}
    result.update(answers(loaded, held_out_locates(args.samples)))
    print(json.dumps({"boxes": result["boxes"]}))
    print(json.dumps({"transposed": result["transposed"]}))
    if args.probe > 0:
        result["probe"] = probe(args.model, loaded, held_out_locates(args.probe))
        print(json.dumps({"probe": result["probe"]}))
    if args.attention > 0:
        result["attention"] = attention(args.model, loaded, args.attention)
        print(json.dumps({"attention": result["attention"]}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
