"""Constrained decoding: a request may limit which tokens can come next.

A constraint is any object with `allowed(generated) -> ids | None`, asked before each
sampled token with the ids generated so far: the next token is drawn from `ids` only
(their logits, bias included, keep their order), or from the whole vocabulary when it
answers None (or an empty set, so that a constraint can never leave a request stuck).

`DiagramLabels` keeps the labels of a diagram description ("Nodes: a, b. Edges: a -> b.",
the answer format of the embedded VLM's `describe-diagram` task) to the words the OCR
read in the picture. The small model reads the arrows well but copies a word it never
saw in training badly (`jump` written `jred`, or a stray `H`); restricted to the words on
the page, it only has to choose which one.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol

from .tokenizer import Tokenizer


class TokenConstraint(Protocol):
    def allowed(self, generated: Sequence[int]) -> Sequence[int] | None: ...


NODES, EDGES = "Nodes:", "Edges:"
_SLOT_END = re.compile(r",|->")  # what closes one label of a list and opens the next


class Slot(NamedTuple):
    text: str  # the label being written, with the spaces before it
    first: bool  # whether it is its list's first
    nodes: tuple[str, ...]  # the node list's labels before it (empty in the edge list)


def label_slot(text: str) -> Slot | None:
    """Where `text` (an answer so far) stands in the `Nodes: ... . Edges: ... .` format;
    None when it is not in a label (before the lists, between them, after them, or
    another format)."""
    body = text.lstrip()
    if not body.startswith(NODES):
        return None
    body = body[len(NODES):]
    cut = body.find(EDGES)
    if cut >= 0:
        body = body[cut + len(EDGES):]
    if "." in body:
        return None  # this list has ended
    parts = _SLOT_END.split(body)
    nodes = tuple(" ".join(x.split()) for x in parts[:-1]) if cut < 0 else ()
    return Slot(parts[-1], len(parts) == 1, nodes)


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


class _Vocabulary(NamedTuple):
    by_text: dict[str, list[int]]  # a token's text -> its ids
    sorted: list[str]  # the texts, sorted (prefix search)
    closing: frozenset[int]  # may follow a finished label: special, or no word start
    period: list[int]  # begin with "." (after spaces): end a list
    opens: dict[int, str]  # close one label and begin the next (", x"): what they begin


def _vocabulary(tokenizer: Tokenizer) -> _Vocabulary:
    """The tables a constraint needs of a tokenizer's vocabulary, built once per tokenizer
    (a request's constraint is built per request; a 150k vocabulary takes a while)."""
    cached = getattr(tokenizer, "_constrain_vocabulary", None)
    if cached is not None:
        return cached
    texts = tokenizer.token_texts()
    by_text: dict[str, list[int]] = {}
    for i, t in enumerate(texts):
        if t:
            by_text.setdefault(t, []).append(i)
    v = _Vocabulary(
        by_text, sorted(by_text),
        frozenset(i for i, t in enumerate(texts) if t is None or not _word_char(t[0])),
        [i for i, t in enumerate(texts) if t and t.lstrip().startswith(".")],
        {i: _SLOT_END.split(t)[-1].lstrip() for i, t in enumerate(texts)
         if t and "." not in t and _SLOT_END.search(t)})
    tokenizer._constrain_vocabulary = v  # type: ignore[attr-defined]
    return v


class DiagramLabels:
    """Labels of a diagram answer limited to the texts of the OCR `lines` and to their
    words. Inside a label, a token may go on with one of the labels, or finish one and
    go on with anything that is not a letter, digit or underscore (", ", " ->", ".", the
    end); outside labels the model writes freely. The node list names a label at most as
    many times as the OCR read it (each box once)."""

    def __init__(self, tokenizer: Tokenizer, lines: Iterable[str]) -> None:
        self.tokenizer = tokenizer
        self.counts: Counter[str] = Counter()
        for line in lines:
            words = line.split()
            self.counts.update({" ".join(words)} | (set(words) if len(words) > 1 else set()))
        self.counts.pop("", None)
        self.labels = sorted(self.counts)
        v = _vocabulary(tokenizer)
        self._by_text, self._sorted, self._closing = v.by_text, v.sorted, v.closing
        self._period, self._opens = v.period, v.opens

    def _starting_with(self, prefix: str) -> Iterable[int]:
        """Ids whose text starts with `prefix` and goes on with a non-word character."""
        k = bisect.bisect_left(self._sorted, prefix)
        while k < len(self._sorted) and self._sorted[k].startswith(prefix):
            t = self._sorted[k]
            if len(t) > len(prefix) and not _word_char(t[len(prefix)]):
                yield from self._by_text[t]
            k += 1

    def allowed(self, generated: Sequence[int]) -> Sequence[int] | None:
        if not self.labels:
            return None
        where = label_slot(self.tokenizer.decode(list(generated)))
        if where is None:
            return None
        slot, first, listed = where
        used = Counter(listed)
        word = slot.lstrip()
        spaced = not slot  # nothing yet, not even the space before a label
        out: set[int] = set()
        for label in self.labels:
            if not label.startswith(word) or used[label] >= self.counts[label]:
                continue
            rest = label[len(word):]
            for head in [rest] + ([" " + rest] if spaced else []):
                for k in range(1, len(head) + 1):  # a token that goes on with the label
                    out.update(self._by_text.get(head[:k], ()))
                if head:
                    out.update(self._starting_with(head))  # one that ends it and goes on
            if not rest:
                out.update(self._closing)
        if out and first and not word:  # an empty list ("Edges: .") stays possible
            out.update(self._period)
        # a token that also begins the next label must begin one of the labels
        out.difference_update([i for i in out if i in self._opens and not any(
            label.startswith(self._opens[i]) for label in self.labels)])
        return sorted(out) if out else None  # a word of the model's own: free
