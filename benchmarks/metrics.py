"""Pure-Python metrics of the quality harness (no third-party imports).

- `levenshtein` / `edit_similarity`: character edit distance and the CodeXGLUE-style
  edit similarity, 100 * (1 - distance / max(len)), on the two strings as given.
- `exact_match`: the stripped strings are equal (the CodeXGLUE rule).
- `corpus_bleu`: corpus BLEU as tensorflow/nmt `compute_bleu(smooth=True)` defines it, the
  formulation the CodeXGLUE code-to-code evaluator uses (written here from the definition):
  per order n = 1..4, clipped n-gram matches and possible n-grams are summed over the
  corpus; each precision is (matches + 1) / (possible + 1) (add-one for every order); the
  geometric mean of the precisions is multiplied by the brevity penalty, 1 when the
  translation length c exceeds the reference length r, else exp(1 - r / c) (0 when c = 0).
  Segments are split on whitespace; the result is in [0, 1] (x100 to report).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass


def levenshtein(a: str, b: str) -> int:
    """Minimum number of single-character insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(prediction: str, target: str) -> float:
    """100 * (1 - levenshtein / max(len)); two empty strings are 100 % similar."""
    longest = max(len(prediction), len(target))
    if longest == 0:
        return 100.0
    return 100.0 * (1.0 - levenshtein(prediction, target) / longest)


def exact_match(prediction: str, target: str) -> bool:
    return prediction.strip() == target.strip()


def ngrams(tokens: Sequence[str], max_order: int) -> Counter[tuple[str, ...]]:
    """Counts of every n-gram of `tokens` for n = 1..max_order."""
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_order + 1):
        for i in range(len(tokens) - n + 1):
            counts[tuple(tokens[i:i + n])] += 1
    return counts


@dataclass(frozen=True)
class Bleu:
    bleu: float  # in [0, 1]
    precisions: tuple[float, ...]  # smoothed, per order
    brevity_penalty: float
    ratio: float  # translation length / reference length
    translation_length: int
    reference_length: int


def corpus_bleu(references: Sequence[Sequence[Sequence[str]]],
                translations: Sequence[Sequence[str]], max_order: int = 4,
                smooth: bool = True) -> Bleu:
    """BLEU of tokenized `translations` against lists of tokenized `references`.

    references[i] is the list of reference token lists of segment i (CodeXGLUE has one);
    the reference length of a segment is its shortest reference, as in tensorflow/nmt.
    """
    if len(references) != len(translations):
        raise ValueError("references and translations differ in length")
    matches = [0] * max_order
    possible = [0] * max_order
    ref_len = trans_len = 0
    for refs, trans in zip(references, translations, strict=True):
        ref_len += min(len(r) for r in refs)
        trans_len += len(trans)
        merged: Counter[tuple[str, ...]] = Counter()
        for r in refs:
            merged |= ngrams(r, max_order)
        overlap = ngrams(trans, max_order) & merged
        for gram, count in overlap.items():
            matches[len(gram) - 1] += count
        for n in range(1, max_order + 1):
            if len(trans) - n + 1 > 0:
                possible[n - 1] += len(trans) - n + 1
    if smooth:
        precisions = [(m + 1.0) / (p + 1.0) for m, p in zip(matches, possible, strict=True)]
    else:
        precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible, strict=True)]
    geo_mean = (math.exp(sum(math.log(p) for p in precisions) / max_order)
                if min(precisions) > 0 else 0.0)
    ratio = trans_len / ref_len if ref_len else 0.0
    if trans_len == 0:
        bp = 0.0
    elif ratio > 1.0 or ref_len == 0:
        bp = 1.0
    else:
        bp = math.exp(1.0 - 1.0 / ratio)
    return Bleu(geo_mean * bp, tuple(precisions), bp, ratio, trans_len, ref_len)


def bleu_strings(references: Sequence[str], predictions: Sequence[str],
                 max_order: int = 4, smooth: bool = True) -> float:
    """CodeXGLUE's figure: corpus BLEU-4 x 100 on whitespace tokens of stripped strings."""
    refs = [[r.strip().split()] for r in references]
    preds = [p.strip().split() for p in predictions]
    return 100.0 * corpus_bleu(refs, preds, max_order, smooth).bleu
