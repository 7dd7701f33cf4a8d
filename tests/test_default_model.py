"""The embedded default model: shipped in the HF layout, loaded alike by transformers and
codevista (same greedy tokens), used by the CLI when no model is given."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from codevista.models import formats
from codevista.models.engine import Engine, SamplingParams
from codevista.models.loader import DEFAULT_MODEL_DIR, load_model
from tiny_models import load_reference

PROMPTS = [
    formats.plain("python", "def fibonacci(n):\n    "),
    formats.fim_spm("python", "def area(r):\n    return ", "\n\nprint(area(2))\n"),
    formats.translation("java", "public int add(int a, int b) { return a + b; }", "csharp"),
]


def test_shipped_files_and_size():
    names = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors",
            "generation_config.json", "MODEL_CARD.md"} <= names
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir())
    assert total <= 60 * 1024 * 1024


def test_special_tokens_are_single_ids():
    tok = load_model(DEFAULT_MODEL_DIR).tokenizer
    for token in formats.SPECIAL_TOKENS:
        ids = tok.encode(token)
        assert len(ids) == 1 and tok.token_to_id(token) == ids[0]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_transformers_and_codevista_agree_greedily(prompt):
    loaded = load_model(DEFAULT_MODEL_DIR)
    ids = loaded.tokenizer.encode(prompt)
    ref = load_reference(DEFAULT_MODEL_DIR)
    with torch.no_grad():  # stops after <|endoftext|>, which it includes
        out = ref.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32)
    expected = out[0, len(ids):].tolist()
    if expected and expected[-1] == loaded.config.eos_token_ids[0]:
        expected = expected[:-1]
    with Engine(loaded) as engine:  # stops at <|endoftext|>, which it leaves out
        ours = engine.generate(ids, SamplingParams(max_new_tokens=32))
    assert ours.token_ids == expected
    assert len(expected) > 0


def test_cli_uses_the_embedded_model_by_default():
    proc = subprocess.run(
        [sys.executable, "-m", "codevista.server.cli", "generate", "--language", "python",
         "--prompt", "import os\n\ndef main():\n    ", "--max-tokens", "16",
         "--temperature", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_eot_line_starts_benchmark_runs_on_the_shipped_model(tmp_path):
    """benchmarks/eot_line_starts.py: shares are percentages of the points asked for."""
    import json
    from pathlib import Path

    body = "".join(f"def f{i}(x):\n    y = x + {i}\n    return y\n\n" for i in range(30))
    rows = [{"lang": "python", "path": f"m{k}.py", "text": body} for k in range(2)]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "eot_line_starts.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(DEFAULT_MODEL_DIR),
                           "--corpus", str(tmp_path), "--points", "5"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["points"] == 5
    for kind in ("plain", "end of file"):
        assert result[kind]["eot_greedy_pct"] in {0.0, 20.0, 40.0, 60.0, 80.0, 100.0}
        assert 0 <= result[kind]["eot_mean_prob_pct"] <= 100


def test_position_loss_benchmark_scores_only_files_long_enough(tmp_path):
    """benchmarks/position_loss.py: a block mean per --block positions, over the files of
    at least --length tokens (a short one is skipped); a repeated body is learnt in
    context, so its later blocks cost less than the first."""
    import json
    from pathlib import Path

    body = "".join(f"def f{i}(x):\n    y = x + {i}\n    return y\n\n" for i in range(40))
    rows = [{"lang": "python", "path": "long.py", "text": body * 2},
            {"lang": "python", "path": "short.py", "text": "x = 1\n"}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "position_loss.py"
    proc = subprocess.run([sys.executable, str(script), "--model", str(DEFAULT_MODEL_DIR),
                           "--corpus", str(tmp_path), "--length", "256", "--block", "64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["files"] == 1 and result["length"] == 256
    blocks = result["mean_loss_by_block"]
    assert len(blocks) == 4 and all(v > 0 for v in blocks)
    assert blocks[-1] < blocks[0]
