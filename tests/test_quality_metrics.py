"""benchmarks/metrics.py against known values, and benchmarks/quality.py end to end on a
tiny random model whose tokenizer has the codevista special tokens."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("codevista_bench_metrics",
                                               ROOT / "benchmarks" / "metrics.py")
assert _spec is not None and _spec.loader is not None
metrics = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = metrics  # dataclasses look their module up there
_spec.loader.exec_module(metrics)


def bleu(refs: list[str], preds: list[str]):
    return metrics.corpus_bleu([[r.split()] for r in refs], [p.split() for p in preds])


# -- BLEU ------------------------------------------------------------------------------------

def test_identical_corpus_scores_100():
    refs = ["public int Foo ( ) { return 1 ; }", "a b", "x"]
    assert metrics.bleu_strings(refs, refs) == pytest.approx(100.0)
    assert metrics.bleu_strings(refs, [f"  {r}  " for r in refs]) == pytest.approx(100.0)


def test_hand_computed_example():
    # hypothesis n-grams matched / possible: 1-grams 5/5, 2-grams 3/4 (the cat, on the,
    # the mat), 3-grams 1/3 (on the mat), 4-grams 0/2; smoothed (m+1)/(p+1).
    b = bleu(["the cat is on the mat"], ["the cat on the mat"])
    assert b.precisions == pytest.approx((6 / 6, 4 / 5, 2 / 4, 1 / 3))
    assert (b.translation_length, b.reference_length) == (5, 6)
    assert b.brevity_penalty == pytest.approx(math.exp(1 - 6 / 5))
    expected = math.exp(1 - 6 / 5) * (1 * 0.8 * 0.5 / 3) ** 0.25
    assert b.bleu == pytest.approx(expected)
    assert metrics.bleu_strings(["the cat is on the mat"], ["the cat on the mat"]) == \
        pytest.approx(100 * expected)


def test_counts_are_summed_over_the_corpus_and_clipped():
    # "the the the" against "the cat": unigram matches clipped to 1 of 3.
    b = bleu(["the cat", "a b c"], ["the the the", "a b c"])
    # 1-grams: 1 + 3 of 3 + 3; 2-grams: 0 + 2 of 2 + 2; 3-grams: 0 + 1 of 1 + 1; 4: 0 of 0.
    assert b.precisions == pytest.approx((5 / 7, 3 / 5, 2 / 3, 1 / 1))
    assert b.brevity_penalty == 1.0  # c = 6 > r = 5


def test_brevity_penalty():
    short = bleu(["a b c d e f g h"], ["a b c d"])
    assert short.brevity_penalty == pytest.approx(math.exp(1 - 8 / 4))
    assert short.ratio == pytest.approx(0.5)
    long = bleu(["a b c d"], ["a b c d e f g h"])
    assert long.brevity_penalty == 1.0
    equal = bleu(["a b c d"], ["d c b a"])
    assert equal.brevity_penalty == 1.0
    assert bleu(["a b"], [""]).bleu == 0.0  # empty output: no division by zero


def test_smoothing_keeps_zero_matches_finite_and_positive():
    b = bleu(["a b c d"], ["w x y z"])
    assert b.precisions == pytest.approx((1 / 5, 1 / 4, 1 / 3, 1 / 2))
    assert math.isfinite(b.bleu) and b.bleu > 0
    assert b.bleu == pytest.approx((1 / 120) ** 0.25)
    unsmoothed = metrics.corpus_bleu([["a b c d".split()]], ["w x y z".split()], smooth=False)
    assert unsmoothed.bleu == 0.0


def test_multiple_references_use_the_shortest_length_and_merged_counts():
    b = metrics.corpus_bleu([["a b c".split(), "a b c d e".split()]], ["a b c d".split()])
    assert b.reference_length == 3
    assert b.precisions[0] == pytest.approx(5 / 5)


# -- edit distance ------------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "d"), [
    ("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "abc", 3), ("abc", "", 3),
    ("", "", 0), ("same", "same", 0), ("abc", "acb", 2), ("return x", "return y;", 2)])
def test_levenshtein(a, b, d):
    assert metrics.levenshtein(a, b) == d
    assert metrics.levenshtein(b, a) == d


def test_edit_similarity_and_exact_match():
    assert metrics.edit_similarity("kitten", "sitting") == pytest.approx(100 * (1 - 3 / 7))
    assert metrics.edit_similarity("", "") == 100.0
    assert metrics.edit_similarity("abc", "") == 0.0
    assert metrics.edit_similarity("abcd", "abcd") == 100.0
    assert metrics.exact_match("  x = 1 ", "x = 1")
    assert not metrics.exact_match("x = 1", "x = 2")


# -- quality.py end to end -----------------------------------------------------------------

_CODE = {
    "python": "def f{i}(a, b):\n    total = a + b * {i}\n    return total - {i}\n\n\n"
              "class Box{i}:\n    def __init__(self, value):\n        self.value = value\n\n",
    "java": "public class Box{i} {{\n    private int value = {i};\n\n"
            "    public int get() {{\n        return value + {i};\n    }}\n}}\n",
    "go": "func add{i}(a int, b int) int {{\n\treturn a + b + {i}\n}}\n",
}


def _tokenizer(out: Path) -> None:
    """The tiny test tokenizer, with every codevista special token."""
    from codevista.models.formats import SPECIAL_TOKENS
    from tiny_models import train_tokenizer

    texts = [c.format(i=i) for c in _CODE.values() for i in range(20)]
    train_tokenizer(out, special=SPECIAL_TOKENS, texts=texts, vocab_size=360)


def test_quality_harness_end_to_end(tmp_path):
    from tiny_models import VOCAB, make_checkpoint

    _tokenizer(tmp_path / "tok")
    tok_size = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    assert len(tok_size["model"]["vocab"]) + len(tok_size["added_tokens"]) <= VOCAB
    # A short context, so that bpb needs several windows and prompts get truncated.
    model = make_checkpoint("qwen2", tmp_path / "model", tmp_path / "tok", max_positions=192)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with (corpus / "test.jsonl").open("w") as f:
        for lang, code in _CODE.items():
            for k in range(2):
                text = "".join(code.format(i=10 * k + i) for i in range(6))
                f.write(json.dumps({"lang": lang, "source": "synthetic", "path": f"{lang}{k}",
                                    "text": text}) + "\n")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    java = ["public int Get() { return x; }", "void f(int a) { g(a); }",
            "public String name() { return n; }", "int h() { return 0; }"]
    cs = ["public int Get() { return x; }", "void F(int a) { G(a); }",
          "public string Name() { return n; }", "int H() { return 0; }"]
    (pairs / "valid.java-cs.txt.java").write_text("\n".join(java) + "\n")
    (pairs / "valid.java-cs.txt.cs").write_text("\n".join(cs) + "\n")

    out, md = tmp_path / "results.json", tmp_path / "results.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--model", str(model),
         "--corpus", str(corpus), "--pairs", str(pairs), "--langs", "python,java,go,rust",
         "--samples", "3", "--translation-limit", "3", "--bpb-bytes", "1500",
         "--context", "768", "--threads", "1", "--out", str(out), "--markdown", str(md)],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [x["metric"] for x in lines] == ["bpb", "line", "fim", "translate"]

    results = json.loads(out.read_text())
    for group in ("bpb", "line", "fim", "translate", "examples", "model_info"):
        assert group in results
    bpb = results["bpb"]["per_lang"]
    assert bpb["rust"]["files"] == 0  # no held-out rust files in this corpus
    for lang in ("python", "java", "go"):
        assert bpb[lang]["bpb"] > 0 and bpb[lang]["scored_bytes"] > 0
        assert bpb[lang]["bpb_tagged"] > 0
        assert bpb[lang]["text_bytes"] <= 1500
        assert results["line"]["per_lang"][lang]["n"] == 3
        assert 0 <= results["line"]["per_lang"][lang]["edit_sim"] <= 100
        for key in ("psm_exact_match", "spm_exact_match", "psm_edit_sim", "spm_edit_sim",
                    "end_exact_match", "end_edit_sim", "server_exact_match",
                    "server_edit_sim"):
            assert 0 <= results["fim"]["per_lang"][lang][key] <= 100
    assert "rust" not in results["line"]["per_lang"]
    tr = results["translate"]
    assert tr["n"] == 3
    for direction in ("java->csharp", "csharp->java"):
        assert 0 <= tr[direction]["bleu"] <= 100
        assert len(tr[direction]["published_test"]) == 4
        assert len(tr[direction]["predictions"]) == len(tr[direction]["raw_predictions"]) == 3
        # the served cut only ever shortens the raw output
        for kept, raw in zip(tr[direction]["predictions"], tr[direction]["raw_predictions"],
                             strict=True):
            assert len(kept) <= len(raw)
    assert "predictions" not in lines[3]["java->csharp"]  # kept out of the stdout line
    # The first pair is identical in both languages: the naive copy gets it right.
    assert tr["java->csharp"]["naive_copy_exact_match"] == pytest.approx(100 / 3, abs=0.01)
    assert 1 <= len(results["examples"]) <= 6
    assert {"prompt_tail", "prediction", "target"} <= set(results["examples"][0])
    assert "## Java <-> C# translation" in md.read_text()

    # Deterministic: a second run of one group gives the same numbers.
    proc2 = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--model", str(model),
         "--corpus", str(corpus), "--pairs", str(pairs), "--langs", "python,java,go",
         "--samples", "3", "--skip", "bpb,fim,translate", "--threads", "1"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    again = [json.loads(x) for x in proc2.stdout.splitlines() if x.startswith("{")]
    assert again[0]["per_lang"] == results["line"]["per_lang"]
