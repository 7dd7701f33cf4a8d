"""Keystroke latency of the real server over stdio, typing a real source file.

    python benchmarks/lsp_latency.py [--model DIR] [--file PATH] [--chars 600] [--cps 8]

Types the first --chars characters of --file (default: `textwrap.py` from the running
Python's standard library: real code, not written for this benchmark) into a new
document at --cps characters per second. Every keystroke sends an incremental didChange
and a streamed inline-completion request, and cancels the previous request if it is still
running, as editors do. Prints one JSON line: p50/p95 keystroke-to-first-partial and
keystroke-to-final (first partial: every request that streamed one; final: the requests
answered rather than cancelled by the next keystroke), the share of prompt
tokens served from the KV cache, and the requests answered without the model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sysconfig
from pathlib import Path

from codevista.server.driver import Driver


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 1)


async def run(args: argparse.Namespace) -> dict:
    text = Path(args.file).read_text(encoding="utf-8")[: args.chars]
    driver = Driver()
    await driver.start({"modelPath": args.model} if args.model else {})
    status = await driver.wait_ready()
    if status["state"] != "ready":
        raise SystemExit(f"model failed to load: {status['message']}")
    uri = "file:///bench/typed.py"
    driver.open(uri, "", "python")
    line = col = 0
    pending = None
    ids = []
    for ch in text:
        if pending is not None and not pending[1].done():
            driver.cancel(pending[0])
        driver.insert(uri, line, col, ch)
        line, col = (line + 1, 0) if ch == "\n" else (line, col + 1)
        pending = driver.request(uri, line, col)
        ids.append(pending[0])
        await asyncio.sleep(1.0 / args.cps)
    await asyncio.gather(pending[1], return_exceptions=True)
    await asyncio.sleep(0.2)
    stats = await driver.command("codevista.stats")
    get = (lambda k: stats[k]) if isinstance(stats, dict) else (lambda k: getattr(stats, k))
    await driver.stop()
    timings = [driver.partials[i] for i in ids]
    answered = [t for t in timings if not t.cancelled and t.final is not None]
    # Ghost text appears with the first partial, also for requests the next keystroke
    # later cancelled; the final answer exists only for the requests not cancelled.
    shown = [t for t in timings if t.first_partial]
    first = [1000 * (t.first_partial - t.sent) for t in shown]
    final = [1000 * (t.final - t.sent) for t in answered]
    return {"file": str(args.file), "keystrokes": len(timings), "answered": len(answered),
            "cancelled": sum(t.cancelled for t in timings),
            "errors_other_than_cancel": sorted({t.error[:80] for t in timings if t.error
                                                and "cancel" not in t.error.lower()}),
            "requests_with_a_partial": len(shown),
            "first_partial_ms_p50": pct(first, 0.5), "first_partial_ms_p95": pct(first, 0.95),
            "final_ms_p50": pct(final, 0.5), "final_ms_p95": pct(final, 0.95),
            "final_ms_mean": round(statistics.mean(final), 1) if final else None,
            "cache_share": get("cacheShare"), "prompt_tokens": get("promptTokens"),
            "answered_without_model": get("answeredWithoutModel"),
            "model_requests": get("requests") - get("answeredWithoutModel")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--file", default=str(Path(sysconfig.get_paths()["stdlib"]) /
                                           "textwrap.py"))
    ap.add_argument("--chars", type=int, default=600)
    ap.add_argument("--cps", type=float, default=8.0)
    print(json.dumps(asyncio.run(run(ap.parse_args()))), flush=True)


if __name__ == "__main__":
    main()
