"""The engine benchmark runs end to end (on a tiny model; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_benchmark_prints_results_and_ratios(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine.py"), "--quick", "--repeat", "1",
         "--decode-tokens", "8", "--cache", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    engines = {line.get("engine") for line in lines}
    assert {"codevista-float32", "codevista-int8", "transformers-float32"} <= engines
    ratios = lines[-1]
    for engine in ("codevista-float32", "codevista-int8"):
        for key in ("decode_vs_transformers", "prefill_256_vs_transformers",
                    "ttft_append_over_decode_step"):
            assert ratios[engine][key] > 0
    cv = next(x for x in lines if x.get("engine") == "codevista-float32")
    assert cv["lookup_identical"] is True and cv["lookup_speedup"] > 0
    assert cv["lookup_identical_end"] is True and cv["lookup_speedup_end"] > 0
    accuracy = next(x["int8_accuracy"] for x in lines if "int8_accuracy" in x)
    assert 0 <= accuracy["max_logit_rel_error"] < 0.1


def test_lookup_only_measures_both_cursor_places_per_dtype(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine.py"), "--quick", "--lookup-only",
         "--decode-tokens", "8", "--cache", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [x["engine"] for x in lines] == ["codevista-float32", "codevista-int8"]
    for x in lines:
        assert x["lookup_identical"] is True and x["lookup_identical_end"] is True
        assert x["lookup_prompts"] == x["lookup_prompts_end"] == 12


def test_interleaved_bursts_run_each_engine_in_its_own_process(tmp_path):
    """--interleaved alternates bursts between engines that each live in a worker
    process (engines sharing a process slowed each other), and reports their medians."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "engine.py"), "--quick", "--interleaved",
         "2", "--decode-tokens", "4", "--cache", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["processes"] == "one per engine" and out["rounds"] == 2
    assert set(out["interleaved_decode_tps"]) == {"codevista-float32", "codevista-int8"}
    assert all(v > 0 for v in out["interleaved_decode_tps"].values())
