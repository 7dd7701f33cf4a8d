"""Incremental detokenization and stop strings never show half a character."""

from __future__ import annotations

import pytest
from codevista.models.stopping import StopStringMatcher
from codevista.models.tokenizer import IncrementalDetokenizer, Tokenizer

SAMPLES = [
    "def greet():\n    return '你好，世界'  # 中文注释\n",
    "emoji: 🎉🚀👩‍💻 and flags 🇫🇷 done",
    "combining: e\u0301 a\u0308 n\u0303 — Zalgo: Z\u0351\u0355a\u035c",
    "mixed: λ→∀x∈ℝ, Ω≠0; 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \u200d end",
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


@pytest.mark.parametrize("text", SAMPLES)
def test_deltas_join_to_full_decode_without_broken_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    # The tiny tokenizer has no merges for these characters: they arrive byte by byte.
    assert len(ids) > len(text.encode("utf-8")) // 2
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text


def test_invalid_bytes_at_the_end_are_flushed_like_the_full_decode(tokenizer):
    ids = tokenizer.encode("ok 你")[:-1]  # cut inside the last character
    detok = IncrementalDetokenizer(tokenizer)
    joined = "".join(detok.push(i) for i in ids) + detok.flush()
    assert joined == tokenizer.decode(ids)
    assert joined.startswith("ok ")


def test_stop_string_split_across_deltas():
    m = StopStringMatcher(["\n\ndef"])
    out = m.feed("x = 1\n") + m.feed("\nd") + m.feed("ef f():")
    assert m.stopped and out == "x = 1"


def test_stop_string_prefix_is_released_when_it_does_not_match():
    m = StopStringMatcher(["```"])
    out = m.feed("a`") + m.feed("`b")
    assert not m.stopped and out == "a``b"
    assert m.flush() == ""
