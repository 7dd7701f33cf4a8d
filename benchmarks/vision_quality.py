"""Quality of a vision model on the held-out generated split (models/train/vlm_data.py).

    python benchmarks/vision_quality.py [--model models/default/vlm] [--per-kind 60]
        [--kinds count,locate,...] [--server] [--out results.json] [--markdown results.md]

Held-out means other seeds than training and, for diagrams, charts, code and error
dialogs, label words never drawn in training. Each sample is asked with the server's
prompt for the image alone (`formats.vision_prompt(formats.vision_question(task,
question))`), greedy, at most 96 new tokens. `--server` asks through the editor command's
own path instead (`VisionService.explain` on the PNG bytes): the OCR lines in the prompt
when the `ocr` extra is installed, the copy bias and the labels kept to the words read for
diagrams, `transcribe` by the OCR.
Metrics:

count        exact match of the number (scenes of 1-9 objects; per-shape questions may be 0)
color/shape  exact match of the colour / shape word
locate       share of predicted boxes with IoU >= 0.5 against the drawn object's box
diagram      F1 of node labels and F1 of edges (`A -> B`) recovered from the description
chart        exact match (highest bar, a bar's value, or the whole description), also
             per question (chart_highest, chart_value, chart_describe)
transcribe   character error rate: Levenshtein distance / reference length (code pictures
             and error dialogs, also apart: a dialog's answer leaves out its "Error" title)
describe / error  exact match and edit similarity of the description / explanation
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metrics import edit_similarity, levenshtein  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIRST_SEED = 1_000_000  # held-out seeds start here
KINDS = ("count", "color", "shape", "locate", "diagram", "chart", "transcribe", "describe",
         "error")


def iou(a: list[int], b: list[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def parse_diagram(text: str) -> tuple[set[str], set[tuple[str, str]]]:
    nodes_m = re.search(r"Nodes:\s*(.*?)\.\s*(Edges:|$)", text, re.S)
    nodes = {n.strip() for n in nodes_m.group(1).split(",")} if nodes_m else set()
    edges = set(re.findall(r"([\w-]+)\s*->\s*([\w-]+)", text))
    return {n for n in nodes if n}, edges


def f1(pred: set, gold: set) -> float:
    if not pred and not gold:
        return 1.0
    tp = len(pred & gold)
    if tp == 0:
        return 0.0
    p, r = tp / len(pred), tp / len(gold)
    return 2 * p * r / (p + r)


def held_out(per_kind: int, kinds: tuple[str, ...] = KINDS) -> Iterator[Any]:
    """The held-out samples of `kinds`, `per_kind` of each, in seed order: the same
    pictures whichever kinds are asked for."""
    from codevista.models.train.vlm_data import sample

    seen: dict[str, int] = defaultdict(int)
    seed = FIRST_SEED
    while any(seen[k] < per_kind for k in kinds) and seed < FIRST_SEED + 200 * per_kind:
        s = sample("test", seed)
        seed += 1
        if s.kind in kinds and seen[s.kind] < per_kind:
            seen[s.kind] += 1
            yield s


# room for the longest held-out answer written one character per token (a diagram
# description of up to 123 characters, as `vlm.py train --spell` teaches); a model that
# writes the tokenizer's pieces ends far sooner
MAX_ANSWER = 160


class _ImageOnly:
    """Asks with the image-only prompt on the engine directly."""

    def __init__(self, model_dir: Path) -> None:
        from codevista.models.engine import Engine
        from codevista.models.loader import load_model

        self.loaded = load_model(model_dir)
        if self.loaded.vision is None:
            raise SystemExit(f"{model_dir} is not a vision model")
        self.engine = Engine(self.loaded)

    def __enter__(self) -> _ImageOnly:
        self.engine.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.__exit__(*exc)

    def ask(self, s: Any) -> str:
        from codevista.models import formats
        from codevista.models.engine import SamplingParams

        vision, tok = self.loaded.vision, self.loaded.tokenizer
        prompt = formats.vision_prompt(formats.vision_question(s.task, s.question),
                                       tok.tok.id_to_token(vision.image_token_id))
        ids = tok.encode(prompt, add_special_tokens=False)
        out = self.engine.generate(ids, SamplingParams(max_new_tokens=MAX_ANSWER),
                                   images=[vision.preprocess(s.image)]).text
        return _trim(s, out)


class _ServerPath:
    """Asks as `codevista.explainImage` does, on the picture's PNG bytes."""

    def __init__(self, model_dir: Path) -> None:
        import asyncio

        from codevista.server.features.vision import VisionService

        self.loop = asyncio.new_event_loop()
        self.service = VisionService()
        self.backend = self.loop.run_until_complete(
            self.service.ensure(str(model_dir), lambda message: None))

    def __enter__(self) -> _ServerPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.service.close()
        self.loop.close()

    def ask(self, s: Any) -> str:
        import io

        from codevista.models.vision.image import open_image

        buf = io.BytesIO()
        s.image.save(buf, "PNG")
        r = self.loop.run_until_complete(self.service.explain(
            self.backend, open_image(buf.getvalue()), s.task, s.question, max_tokens=MAX_ANSWER))
        return _trim(s, r.text)


def _trim(s: Any, out: str) -> str:
    """The answer without the blank space around it; a transcription keeps its first line's
    indentation (the reference has it)."""
    return out.strip("\n") if s.kind == "transcribe" else out.strip()


def evaluate(model_dir: Path, per_kind: int, kinds: tuple[str, ...] = KINDS,
             server: bool = False) -> dict[str, Any]:
    from codevista.server.vision import parse_boxes

    scores: dict[str, list[float]] = defaultdict(list)
    extra: dict[str, list[float]] = defaultdict(list)
    examples: dict[str, list[dict[str, str]]] = defaultdict(list)
    seen: dict[str, int] = defaultdict(int)
    t0 = time.time()
    with (_ServerPath if server else _ImageOnly)(model_dir) as asker:
        for s in held_out(per_kind, kinds):
            seen[s.kind] += 1
            out = asker.ask(s)
            gold = s.answer
            if s.kind == "locate":
                boxes = parse_boxes(out)
                scores["locate"].append(float(bool(boxes) and iou(boxes[0], s.meta["box"])
                                              >= 0.5))
            elif s.kind == "diagram":
                nodes, edges = parse_diagram(out)
                scores["diagram"].append(f1(edges, set(map(tuple, s.meta["edges"]))))
                extra["diagram_nodes"].append(f1(nodes, set(s.meta["nodes"])))
            elif s.kind == "transcribe":
                scores["transcribe"].append(levenshtein(out, gold) / max(1, len(gold)))
                # error dialogs (their red title bar reads "Error", which the answer leaves
                # out: the OCR reads it) apart from code pictures
                kind = "dialog" if s.meta["text_boxes"][0][0] == "Error" else "code"
                extra[f"transcribe_cer_{kind}"].append(scores["transcribe"][-1])
            else:
                scores[s.kind].append(float(out == gold))
                if s.kind in ("describe", "error"):
                    extra[f"{s.kind}_edit_similarity"].append(edit_similarity(out, gold))
                if s.kind == "chart":  # the three questions apart
                    q = ("highest" if s.question and "highest" in s.question
                         else "value" if s.question else "describe")
                    extra[f"chart_{q}"].append(scores["chart"][-1])
            if len(examples[s.kind]) < 3:
                examples[s.kind].append({"question": s.question or s.task, "answer": gold,
                                         "model": out})
    results = {k: round(100 * sum(v) / len(v), 1) for k, v in scores.items() if v}
    results["transcribe_cer"] = results.pop("transcribe", None)
    results["diagram_edge_f1"] = results.pop("diagram", None)
    results.update({k: round((1 if k.endswith("similarity") else 100) * sum(v) / len(v), 1)
                    for k, v in extra.items() if v})
    return {"model": str(model_dir), "path": "server" if server else "image only",
            "per_kind": dict(seen), "metrics": results,
            "seconds": round(time.time() - t0, 1), "examples": examples}


def markdown(r: dict[str, Any]) -> str:
    m = r["metrics"]
    rows = [("counting accuracy (1-9 objects)", m.get("count"), "≥ 90"),
            ("colour QA accuracy", m.get("color"), ""),
            ("shape QA accuracy", m.get("shape"), ""),
            ("grounding accuracy, IoU ≥ 0.5", m.get("locate"), "≥ 80"),
            ("diagram edge F1 (node F1)",
             f"{m.get('diagram_edge_f1')} ({m.get('diagram_nodes')})", "≥ 80"),
            ("bar chart QA exact match (highest bar / a bar's value / description)",
             f"{m.get('chart')} ({m.get('chart_highest')} / {m.get('chart_value')} / "
             f"{m.get('chart_describe')})", ""),
            ("transcription character error rate (code / error dialogs)",
             f"{m.get('transcribe_cer')} ({m.get('transcribe_cer_code')} / "
             f"{m.get('transcribe_cer_dialog')})", "≤ 5"),
            ("scene description exact match / edit similarity",
             f"{m.get('describe')} / {m.get('describe_edit_similarity')}", ""),
            ("error explanation exact match / edit similarity",
             f"{m.get('error')} / {m.get('error_edit_similarity')}", "")]
    lines = ["| metric (held-out, %) | value | goal |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "vlm")
    p.add_argument("--per-kind", type=int, default=60)
    p.add_argument("--kinds", default=",".join(KINDS),
                   help="the kinds to evaluate, comma-separated (each on the same held-out "
                        "pictures as in a full run)")
    p.add_argument("--server", action="store_true",
                   help="ask through the editor command's path (OCR lines, copy bias)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or set(kinds) - set(KINDS):
        p.error(f"--kinds: choose among {', '.join(KINDS)}")
    r = evaluate(args.model, args.per_kind, kinds, args.server)
    print(json.dumps({k: v for k, v in r.items() if k != "examples"}))
    md = markdown(r)
    print(md, file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(r, indent=1))
    if args.markdown:
        args.markdown.write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
