"""Train the byte-level BPE tokenizer of the embedded model.

Fitted on the train split only (a balanced sample per language) plus the train half of the
Java <-> C# pairs; the special tokens of `codevista.models.formats` come first, so their
ids are fixed (0 = <|endoftext|>, ...).

    python -m codevista.models.train.tokenizer --corpus DIR --out DIR [--vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..formats import EOT, SPECIAL_TOKENS
from .data import read_corpus, read_pairs

log = logging.getLogger("codevista.train")


def sample_texts(corpus: Path, pairs: Path, per_lang_bytes: int, seed: int) -> Iterator[str]:
    by_lang = read_corpus(corpus / "train.jsonl")
    rng = random.Random(seed)
    for lang in sorted(by_lang):
        files = list(by_lang[lang])
        rng.shuffle(files)
        used = 0
        for text in files:
            if used >= per_lang_bytes:
                break
            used += len(text.encode())
            yield text
    for java, cs in read_pairs(pairs, "train"):
        yield java
        yield cs


def train_tokenizer(corpus: Path, pairs: Path, out: Path, vocab: int = 8192,
                    per_lang_bytes: int = 4 << 20, seed: int = 0) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(sample_texts(corpus, pairs, per_lang_bytes, seed), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": None,
        "pad_token": EOT, "additional_special_tokens": SPECIAL_TOKENS[1:],
        "model_max_length": 2048, "clean_up_tokenization_spaces": False}, indent=1))
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, required=True)
    ap.add_argument("--pairs", type=Path, required=True, help="codexglue-java-cs directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level="INFO")
    tok = train_tokenizer(args.corpus, args.pairs, args.out, args.vocab, seed=args.seed)
    log.info("tokenizer: %d tokens -> %s", tok.get_vocab_size(), args.out)


if __name__ == "__main__":
    main()
