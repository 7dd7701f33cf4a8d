"""Load: 1,000 inline-completion requests at 20 per second across 5 documents that are being
typed into, one in ten cancelled, while translations and image explanations run back to
back, all on the embedded default models in the real server process over stdio.

Every request must be answered or cancelled (none lost, no other error); latency
percentiles are printed (docs/reliability.md records them with this command:
`pytest tests/e2e/test_load.py -s`); RSS stays bounded; afterwards no engine request,
in-flight completion, command task or asyncio task is left over, and no thread beyond the
bounded worker pool that was there before.

The server process gets a test-only `test.introspect` command through the RawServer
prelude (nothing in the product)."""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time

import psutil
import pytest
from rawlsp import RawServer

pytestmark = pytest.mark.slow

N_REQUESTS, RATE, CANCEL_EVERY = 1000, 20.0, 10

INTROSPECT = """
import asyncio, threading
from codevista.server.app import server

@server.command("test.introspect")
def _introspect(ls, *args):
    engines = []
    for b in (ls.backend, ls.vision.backend):
        if b.engine is not None:
            st = b.engine.stats()
            engines.append({"waiting": st.waiting, "running": st.running,
                            "busySlots": st.busy_slots, "completed": st.completed,
                            "cacheBytes": st.cache_bytes, "cacheBudget": st.cache_budget_bytes})
    return {"tasks": len(asyncio.all_tasks()),
            "threads": sorted(t.name for t in threading.enumerate()),
            "inflight": len(ls.completions.inflight),
            "commandTasks": len(getattr(ls.protocol, "command_tasks", {})),
            "engines": engines}
"""

DOCS = {
    "file:///load/a.py": ("python", "import os\n\n\ndef read_config(path):\n    "),
    "file:///load/B.java": ("java", "public class B {\n    public int size() {\n        "),
    "file:///load/c.go": ("go", "package main\n\nfunc add(a int, b int) int {\n\t"),
    "file:///load/d.js": ("javascript", "function total(items) {\n  let sum = 0;\n  "),
    "file:///load/e.rs": ("rust", "fn main() {\n    let v = vec![1, 2, 3];\n    "),
}
TYPED = "for item in items: total = total + item * 2 if item else 0\n"
TARGETS = ["java", "go", "rust", "csharp", "javascript", "cpp"]
SOURCE = "".join(f"def f{i}(xs):\n    total = 0\n    for x in xs:\n        total += x * {i}\n"
                 f"    return total\n\n\n" for i in range(6))


def _png() -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (320, 200), (250, 250, 250))
    d = ImageDraw.Draw(img)
    d.rectangle([20, 20, 140, 90], outline=(0, 0, 0), width=3)
    d.rectangle([180, 100, 300, 180], fill=(200, 30, 30))
    d.line([140, 55, 240, 100], fill=(0, 0, 255), width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _introspect(s: RawServer) -> dict:
    return s.request("workspace/executeCommand", {"command": "test.introspect"})["result"]


def _end(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    return len(lines) - 1, len(lines[-1].encode("utf-16-le")) // 2


def test_1000_completions_with_cancellations_during_translation_and_vision(tmp_path):
    rng = random.Random(7)
    with RawServer(log_level="WARNING", prelude=INTROSPECT) as s:
        proc = psutil.Process(s.proc.pid)
        s.initialize({}, root=tmp_path)  # the embedded default model
        assert s.wait_status(120)["state"] == "ready"
        texts = {}
        for uri, (lang, text) in DOCS.items():
            s.open(uri, text, lang)
            texts[uri] = text
        s.open("file:///load/src.py", SOURCE)
        png = _png()
        translate = {"command": "codevista.translate", "arguments": [
            {"uri": "file:///load/src.py", "targetLanguage": "java"}]}
        explain = {"command": "codevista.explainImage", "arguments": [
            {"image": {"data": png}, "task": "describe-diagram"}]}
        # warm-up: one of each, so that the VLM is loaded and pools exist before the baseline
        assert "result" in s.request("workspace/executeCommand", translate, timeout=300)
        assert "result" in s.request("workspace/executeCommand", explain, timeout=300)
        for uri, text in texts.items():
            assert "result" in s.inline(uri, *_end(text))
        time.sleep(1.0)
        base = _introspect(s)
        rss_base = proc.memory_info().rss

        # background: translations and explanations back to back for the whole run
        stop = threading.Event()
        long_results: list[tuple[str, dict, float]] = []

        def long_work() -> None:
            n = 0
            while not stop.is_set():
                n += 1  # a new target language each time: no full cache hit
                translate["arguments"][0]["targetLanguage"] = TARGETS[n % len(TARGETS)]
                # the short request first: a long translation on a slow machine must not
                # leave the load without any image request
                for name, params in (("explain", explain), ("translate", translate)):
                    t0 = time.monotonic()
                    long_results.append((name, s.request("workspace/executeCommand", params,
                                                         timeout=300),
                                         time.monotonic() - t0))
                    if stop.is_set():
                        return

        rss_peak = [rss_base]

        def watch() -> None:
            while not stop.is_set():
                rss_peak[0] = max(rss_peak[0], proc.memory_info().rss)
                time.sleep(0.25)

        workers = [threading.Thread(target=long_work), threading.Thread(target=watch)]
        for w in workers:
            w.start()

        sent: dict[int, float] = {}
        cancelled_ids: set[int] = set()
        uris = list(DOCS)
        t_start = time.monotonic()
        for k in range(N_REQUESTS):
            due = t_start + k / RATE
            time.sleep(max(0.0, due - time.monotonic()))
            uri = uris[k % len(uris)]
            ch = TYPED[(k // len(uris)) % len(TYPED)]
            line, col = _end(texts[uri])
            s.notify("textDocument/didChange", {
                "textDocument": {"uri": uri, "version": k + 2},
                "contentChanges": [{"range": {"start": {"line": line, "character": col},
                                              "end": {"line": line, "character": col}},
                                    "text": ch}]})
            texts[uri] += ch
            msg_id = s.send_request("textDocument/inlineCompletion", {
                "textDocument": {"uri": uri}, "position": dict(zip(
                    ("line", "character"), _end(texts[uri]), strict=True)),
                "context": {"triggerKind": 2}})
            sent[msg_id] = time.monotonic()
            if k % CANCEL_EVERY == CANCEL_EVERY - 1:
                time.sleep(rng.uniform(0, 0.02))
                s.notify("$/cancelRequest", {"id": msg_id})
                cancelled_ids.add(msg_id)
        send_s = time.monotonic() - t_start

        answered, cancelled, errors, lost, latency, shown = 0, 0, [], [], [], 0
        for msg_id, t0 in sent.items():
            try:
                r = s.response(msg_id, 60)
            except Exception:  # noqa: BLE001 - counted, asserted below
                lost.append(msg_id)
                continue
            if "result" in r:
                answered += 1
                shown += bool(r["result"] and r["result"]["items"]
                              and r["result"]["items"][0]["insertText"])
                latency.append(s.arrived[json.dumps(msg_id)] - t0)
            elif r["error"]["code"] == -32800:
                cancelled += 1
            else:
                errors.append(r)
        stop.set()
        for w in workers:
            w.join(300)
        time.sleep(2.0)
        after = _introspect(s)
        rss_end = proc.memory_info().rss

    latency.sort()

    def pct(p: float) -> float:
        return latency[min(len(latency) - 1, int(p * len(latency)))] * 1000

    long_ok = [n for n, r, _ in long_results if "result" in r]
    chars = {name: sum(len(r["result"]["text"]) for n, r, _ in long_results
                       if n == name and "result" in r) for name in ("translate", "explain")}
    report = {
        "requests": N_REQUESTS, "sent_in_s": round(send_s, 1), "answered": answered,
        "with_ghost_text": shown, "cancelled": cancelled,
        "cancel_requests_sent": len(cancelled_ids),
        "errors": len(errors), "lost": len(lost),
        "latency_ms": {"p50": round(pct(0.50)), "p95": round(pct(0.95)),
                       "p99": round(pct(0.99)), "max": round(latency[-1] * 1000)},
        "translations": long_ok.count("translate"), "explanations": long_ok.count("explain"),
        "long_seconds": {name: round(sum(t for n, _, t in long_results if n == name), 1)
                         for name in ("translate", "explain")},
        "long_chars": chars,
        "rss_mb": {"base": rss_base >> 20, "peak": rss_peak[0] >> 20, "end": rss_end >> 20,
                   "cache_growth": (sum(e["cacheBytes"] for e in after["engines"])
                                    - sum(e["cacheBytes"] for e in base["engines"])) >> 20},
        "threads": {"base": len(base["threads"]), "end": len(after["threads"])},
        "tasks": {"base": base["tasks"], "end": after["tasks"]},
    }
    print("\nLOAD", json.dumps(report))
    assert lost == [] and errors == [], (lost[:5], errors[:5])
    assert answered + cancelled == N_REQUESTS
    assert cancelled <= len(cancelled_ids)  # only requests the client cancelled
    assert long_ok and len(long_ok) == len(long_results), long_results
    assert "translate" in long_ok and "explain" in long_ok
    assert pct(0.95) < 2000  # ghost text that arrives after 2 s is useless
    # memory grows only as the prefix caches fill, and they have fixed budgets
    cache = sum(e["cacheBytes"] for e in after["engines"]) - sum(
        e["cacheBytes"] for e in base["engines"])
    budget = sum(e["cacheBudget"] for e in after["engines"])
    assert rss_end - rss_base - cache < 256 << 20
    assert rss_peak[0] - rss_base < budget + (256 << 20)
    # nothing left behind: engine requests, in-flight completions, command tasks, tasks
    assert after["inflight"] == 0 and after["commandTasks"] == 0
    assert all(e["waiting"] == 0 and e["running"] == 0 and e["busySlots"] == 0
               for e in after["engines"])
    assert after["tasks"] <= base["tasks"]
    pool = [t for t in after["threads"] if t.startswith(("asyncio_", "ThreadPoolExecutor"))]
    others = [t for t in after["threads"] if t not in pool]
    base_others = [t for t in base["threads"] if not t.startswith(("asyncio_",
                                                                    "ThreadPoolExecutor"))]
    assert sorted(others) == sorted(base_others)
    # the bounded worker pools: pygls's reader pool (ThreadPoolExecutor-N_k) and asyncio's
    # default executor (asyncio_k) each grow to at most min(32, cores + 4) threads
    pools: dict[str, int] = {}
    for t in pool:
        pools[t.rsplit("_", 1)[0]] = pools.get(t.rsplit("_", 1)[0], 0) + 1
    assert all(n <= min(32, (psutil.cpu_count() or 1) + 4) for n in pools.values()), pools
    assert len(pools) <= 2, pools
