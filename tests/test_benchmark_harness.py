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
    assert {"codevista-float32", "transformers-float32"} <= engines
    ratios = lines[-1]
    for key in ("decode_speedup", "prefill_speedup_256", "ttft_append_over_decode_step"):
        assert ratios[key] > 0
