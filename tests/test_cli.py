"""`codevista generate`: only the generated text on stdout, deterministic when greedy."""

from __future__ import annotations

import subprocess
import sys

from codevista.models.engine import Engine, SamplingParams


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "codevista.server.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_greedy_generation_is_deterministic_and_matches_the_engine(qwen_dir, loaded_qwen):
    args = ("generate", "--model", str(qwen_dir), "--prompt", "def add(a, b):",
            "--max-tokens", "24", "--temperature", "0")
    first, second = _cli(*args), _cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    with Engine(loaded_qwen) as engine:
        expected = engine.generate("def add(a, b):", SamplingParams(max_new_tokens=24)).text
    assert first.stdout == expected + "\n"


def test_stats_go_to_stderr(qwen_dir):
    proc = _cli("generate", "--model", str(qwen_dir), "--prompt", "x", "--max-tokens", "4",
                "--temperature", "0.7", "--seed", "3", "--stats")
    assert proc.returncode == 0
    assert "prompt_tokens=" in proc.stderr and "prompt_tokens=" not in proc.stdout


def test_bad_arguments_exit_nonzero():
    assert _cli("generate", "--model", "/nonexistent", "--prompt", "x").returncode != 0
    assert _cli("generate").returncode != 0
