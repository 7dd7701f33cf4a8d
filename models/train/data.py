"""Training data: corpus files and translation pairs rendered in the model's prompt formats,
tokenized once into a flat uint16 stream with the start offset of every sample.

Mix (seeded, per chunk of ~1,500 characters of a file):
- plain left-to-right code, 50 % (end-of-text only after a file's last chunk);
- fill-in-the-middle, 50 %: suffix-first (SPM) 60 % of those, prefix-first (PSM) 40 %;
  the middle is the rest of a line from a random point half of the time (single-line
  completion, the common editor case), else a span of one to eight lines; in a fifth of
  the suffix-first samples the suffix is empty (or just the final newline an editor
  keeps) and the middle runs to the chunk's end: the user writing at the end of a file,
  where a completion goes on past the line and ends with EOT only where the file does;
- Java <-> C# pairs (CodeXGLUE train split only), both directions, several passes.
"""

from __future__ import annotations

import json
import logging
import random
from collections import defaultdict
from pathlib import Path

import numpy as np

from .. import formats
from ..formats import EOT, FIM_MIDDLE

log = logging.getLogger("codevista.train")
CHUNK_CHARS = 1500


def read_corpus(path: Path) -> dict[str, list[str]]:
    by_lang: dict[str, list[str]] = defaultdict(list)
    with path.open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_lang[row["lang"]].append(row["text"])
    return by_lang


def pair_files(directory: Path, split: str) -> tuple[Path, Path]:
    """(java, cs) files of a CodeXGLUE split, as published: `{split}.java-cs.txt.{java,cs}`."""
    return (directory / f"{split}.java-cs.txt.java", directory / f"{split}.java-cs.txt.cs")


def read_pairs(directory: Path, split: str) -> list[tuple[str, str]]:
    java_path, cs_path = pair_files(directory, split)
    java = java_path.read_text(encoding="utf-8").splitlines()
    cs = cs_path.read_text(encoding="utf-8").splitlines()
    if len(java) != len(cs):
        raise ValueError(f"{java_path.name} and {cs_path.name} differ in length")
    return [(j.strip(), c.strip()) for j, c in zip(java, cs, strict=True)]


def chunks(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Split at line boundaries into pieces of about `size` characters."""
    out, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= size:
            out.append("".join(cur))
            cur, n = [], 0
    if cur:
        out.append("".join(cur))
    return out


def fim_split(text: str, rng: random.Random) -> tuple[str, str, str] | None:
    """(prefix, middle, suffix) at character level, or None if the text is too short."""
    if len(text) < 20:
        return None
    start = rng.randrange(len(text))
    line_end = text.find("\n", start)
    line_end = len(text) if line_end < 0 else line_end
    if rng.random() < 0.5:
        end = line_end  # the rest of the line
    else:
        end = line_end
        for _ in range(rng.randint(0, 7)):
            nxt = text.find("\n", end + 1)
            if nxt < 0:
                break
            end = nxt
        end = min(len(text), end + 1)
    return text[:start], text[start:end], text[end:]


def render_chunk(lang: str, chunk: str, rng: random.Random, last: bool = True) -> str:
    """One training sample of a file's chunk. Plain code ends with EOT only where the file
    ends (`last`): a chunk ends at a line start, and an EOT after every chunk taught the
    model that code ends wherever a line does (it stopped at bare line starts). The sample
    after an open chunk starts with its language tag, which train.Batches never scores."""
    r = rng.random()
    end = EOT if last else ""
    if r < 0.5:
        return formats.plain(lang, chunk) + end
    if r < 0.56 and len(chunk) >= 20:  # a fifth of the suffix-first share: end of file
        start = rng.randrange(len(chunk) - 1)
        tail = "\n" if chunk.endswith("\n") and rng.random() < 0.5 else ""  # editors
        middle = chunk[start:len(chunk) - len(tail)]  # the newline is the suffix
        return formats.fim_spm(lang, chunk[:start], tail) + middle + end
    parts = fim_split(chunk, rng)
    if parts is None:
        return formats.plain(lang, chunk) + end
    prefix, middle, suffix = parts
    if r < 0.8:
        return formats.fim_spm(lang, prefix, suffix) + middle + EOT
    return formats.fim_psm(lang, prefix, suffix) + middle + EOT


def render_pair(src_lang: str, src: str, tgt_lang: str, tgt: str) -> str:
    return formats.translation(src_lang, src, tgt_lang) + tgt + EOT


def build_samples(corpus: Path, pairs: Path, split: str, lang_bytes: dict[str, int],
                  pair_passes: int, seed: int, extra: tuple[Path, ...] = (),
                  chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """`extra`: JSONL files of more train files (corpus.extra_python), added to their
    languages before the budgets apply; never used for the valid split. `chunk_chars`:
    the longest coherent text a sample holds, so the context the model learns to use
    (1 500 characters, about 450 tokens, taught the first stages a loss that rises past
    them; the shipped model's last stage used 3 300, about 1 000 tokens)."""
    rng = random.Random(seed)
    samples: list[str] = []
    by_lang = read_corpus(corpus / f"{split}.jsonl")
    if split == "train":
        for path in extra:
            for lang, texts in read_corpus(path).items():
                by_lang[lang].extend(texts)
    for lang in sorted(by_lang):
        files = by_lang[lang]
        rng.shuffle(files)
        budget, used = lang_bytes.get(lang, 0), 0
        for text in files:
            if used >= budget:
                break
            used += len(text.encode())
            pieces = chunks(text, chunk_chars)
            samples.extend(render_chunk(lang, c, rng, i == len(pieces) - 1)
                           for i, c in enumerate(pieces))
        log.info("%s %s: %.1f MB", split, lang, used / 1e6)
    pair_split = "train" if split == "train" else "valid"
    for _ in range(pair_passes):
        for java, cs in read_pairs(pairs, pair_split):
            samples.append(render_pair("java", java, "csharp", cs))
            samples.append(render_pair("csharp", cs, "java", java))
    rng.shuffle(samples)
    return samples


def tokenize(samples: list[str], tokenizer_path: Path, out: Path) -> tuple[int, int]:
    """Write `out`.tokens.npy (uint16 stream) and `out`.starts.npy (sample offsets)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    if tok.get_vocab_size() > 65535:
        raise ValueError("vocabulary too large for uint16 token storage")
    ids: list[np.ndarray] = []
    starts: list[int] = []
    pos = 0
    for i in range(0, len(samples), 2048):
        for enc in tok.encode_batch(samples[i:i + 2048], add_special_tokens=False):
            a = np.asarray(enc.ids, dtype=np.uint16)
            starts.append(pos)
            pos += len(a)
            ids.append(a)
    np.save(f"{out}.tokens.npy", np.concatenate(ids))
    np.save(f"{out}.starts.npy", np.asarray(starts, dtype=np.int64))
    return pos, len(starts)


def fim_middle_id(tokenizer_path: Path) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(tokenizer_path)).token_to_id(FIM_MIDDLE))
