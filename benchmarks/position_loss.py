"""How well a model uses its context: mean loss by position over long held-out files.

Each of the first --files held-out files (the corpus's test split) of at least --length
tokens is read as `plain` (the language tag, then the code) from its start, cut to
--length tokens and scored in one forward pass; printed: the mean loss (nats per token)
of each block of --block positions. A model that uses its context has a falling or flat
curve; one trained on short samples has a rising one past their length (the embedded
model's first stages, on 1 500-character samples of about 450 tokens, rose past ~300; its
last stage, on 3 300-character samples, levels off past 512).

    python benchmarks/position_loss.py --model models/default/code [--files 40]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from codevista.models import formats
from codevista.models.kv_cache import KVCache
from codevista.models.loader import load_model


def position_loss(model_dir: Path, corpus: Path, files: int, length: int, block: int
                  ) -> dict:
    loaded = load_model(model_dir)
    model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    length = min(length, model.max_positions)
    sums = torch.zeros(length // block, dtype=torch.float64)
    used = 0
    with (corpus / "test.jsonl").open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        ids = tok.encode(formats.plain(row["lang"], row["text"]), add_special_tokens=False)
        if len(ids) < length:
            continue
        x = torch.tensor(ids[:length])
        cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, length, model.dtype,
                        model.device)
        with torch.inference_mode():
            logits = model(x, cache, 0, all_logits=True)
        nll = -torch.log_softmax(logits[:-1].float(), -1).gather(1, x[1:, None]).squeeze(1)
        nll = torch.cat([nll.new_zeros(1), nll])  # position 0 (the tag) is never scored
        for b in range(len(sums)):
            lo = max(1, b * block)
            sums[b] += nll[lo:(b + 1) * block].mean().double()
        used += 1
        if used >= files:
            break
    return {"model": str(model_dir), "files": used, "length": length, "block": block,
            "mean_loss_by_block": [round(v, 3) for v in (sums / max(1, used)).tolist()]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=Path("/work/corpus"))
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--block", type=int, default=128)
    args = ap.parse_args(argv)
    print(json.dumps(position_loss(args.model, args.corpus, args.files, args.length,
                                   args.block)))


if __name__ == "__main__":
    main()
