"""How often a model ends its completion right at a bare line start.

At --points random line starts of held-out files (the corpus's test split; only starts
past a file's first 200 characters and before its last line), the prompt is the file up to
that start as `plain` (the language tag, then the code) and, separately, as the
suffix-first FIM prompt with an empty suffix (the server's prompt when nothing follows the
cursor), each keeping the last --tokens code tokens (700 unless asked). Printed per prompt
kind: the share of points where end-of-text is the greedy choice, and its mean probability.
A model that knows code rarely ends a file in mid-function; the earlier releases did at
every third line start.

    python benchmarks/eot_line_starts.py --model models/default/code [--model OTHER ...]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from codevista.models import formats


def points(corpus: Path, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    with (corpus / "test.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        text = row["text"]
        starts = [i + 1 for i, c in enumerate(text) if c == "\n" and 200 < i < len(text) - 2]
        out += [(row["lang"], text[:s]) for s in rng.sample(starts, min(3, len(starts)))]
    rng.shuffle(out)
    return out[:n]


def measure(model_dir: Path, pts: list[tuple[str, str]], keep: int = 700) -> dict:
    from codevista.models.train.model import CodeLM, shape_of
    from codevista.models.train.train import init_from_hf
    from tokenizers import Tokenizer

    model = CodeLM(shape_of(model_dir))
    init_from_hf(model, model_dir)
    model.eval()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    eot = tok.token_to_id(formats.EOT)
    result = {}
    for kind in ("plain", "end of file"):
        greedy = prob = 0
        for lang, before in pts:
            if kind == "plain":
                text, first = formats.plain(lang, before), 1  # keeps the tag
            else:
                text, first = formats.fim_spm(lang, before, ""), 3  # tag, suffix, prefix
            ids = tok.encode(text, add_special_tokens=False).ids
            ids = ids[:first] + ids[first:][-keep:]
            with torch.no_grad():
                p = torch.softmax(model(torch.tensor([ids]))[0][0, -1].float(), -1)
            greedy += int(p.argmax() == eot)
            prob += float(p[eot])
        result[kind] = {"eot_greedy_pct": round(100 * greedy / len(pts), 1),
                        "eot_mean_prob_pct": round(100 * prob / len(pts), 1)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", required=True)
    ap.add_argument("--corpus", type=Path, default=Path("/work/corpus"))
    ap.add_argument("--points", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=700, help="code tokens kept before a point")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pts = points(args.corpus, args.points, args.seed)
    for m in args.model:
        print(json.dumps({"model": str(m), "points": len(pts), "tokens": args.tokens,
                          **measure(m, pts, args.tokens)}), flush=True)


if __name__ == "__main__":
    main()
