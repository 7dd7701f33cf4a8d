"""`codevista demo`: the product in a terminal.

Starts `codevista serve`, speaks LSP to it as an editor does, types a small program into
a new document at about 8 characters a second and, at each pause, shows the ghost text
streaming in, with its latency and the share of the prompt served from the KV cache.
Works offline on the embedded model; `--model DIR` tries another checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from .driver import Driver

SAMPLE = '''import json
from pathlib import Path


def load_settings(path):
    """Read a JSON settings file, or return defaults."""
    file = Path(path)
    if not file.exists():
        return {}
    with open(file) as f:
        return json.load(f)


def merge(defaults, overrides):
    result = dict(defaults)
    for key, value in overrides.items():
        result[key] = value
    return result
'''

DIM, RESET = "\033[2m", "\033[0m"


async def run(args: argparse.Namespace) -> int:
    out = sys.stdout
    tty = out.isatty()
    driver = Driver()
    shown = {"text": ""}

    def on_partial(_: str, text: str) -> None:
        if tty:
            first = text.split("\n")[0]
            out.write("\r\033[K" + shown["text"] + DIM + first + RESET)
            out.flush()

    driver.on_partial = on_partial
    options = {"modelPath": args.model} if args.model else {}
    await driver.start(options)
    t0 = time.perf_counter()
    status = await driver.wait_ready()
    if status["state"] != "ready":
        print(f"codevista demo: the model did not load: {status['message']}", file=sys.stderr)
        await driver.stop()
        return 1
    print(f"model {status['model']} ready in {time.perf_counter() - t0:.1f} s; typing "
          f"{args.cps:g} characters a second\n")
    uri = "file:///demo/settings_tools.py"
    driver.open(uri, "", "python")
    lines = SAMPLE.split("\n")
    text = SAMPLE[: args.chars or None]
    line, col = 0, 0
    pending: tuple[str, asyncio.Future] | None = None
    for i, ch in enumerate(text):
        if pending is not None and not pending[1].done():
            driver.cancel(pending[0])  # the user kept typing: the old request is stale
        driver.insert(uri, line, col, ch)
        line, col = (line + 1, 0) if ch == "\n" else (line, col + 1)
        typed = lines[line][:col]
        shown["text"] = typed
        pending = driver.request(uri, line, col)
        await asyncio.sleep(1.0 / args.cps)
        # Pause where a person would look at the ghost text: after the indentation of a
        # new line, and before the end of a line.
        nxt = text[i + 1] if i + 1 < len(text) else "\n"
        at_line_start = typed.strip() == "" and nxt not in " \n"
        if not at_line_start and not (nxt == "\n" and typed.rstrip().endswith(":")):
            continue
        try:
            result = await asyncio.wait_for(pending[1], 10)
        except Exception:
            continue
        t = driver.partials[pending[0]]
        suggestion = result.items[0].insert_text if result and result.items else ""
        final = t.final if t.final is not None else time.perf_counter()
        lat = (f"first {1000 * (t.first_partial - t.sent):.0f} ms, "
               if t.first_partial else "") + f"final {1000 * (final - t.sent):.0f} ms"
        ghost = suggestion.replace("\n", "\\n")
        ghost = f"{DIM}{ghost}{RESET}" if tty else f"«{ghost}»"
        out.write(("\r\033[K" if tty else "") + f"{typed}{ghost}    [{lat}]\n")
        out.flush()
    if pending is not None:
        await asyncio.gather(pending[1], return_exceptions=True)
    stats = await driver.command("codevista.stats")
    get = (lambda k: stats[k]) if isinstance(stats, dict) else (lambda k: getattr(stats, k))
    print(f"\n{get('requests')} requests, {get('answeredWithoutModel')} answered without the "
          f"model, {100 * get('cacheShare'):.1f} % of prompt tokens served from the KV cache")
    await driver.stop()
    return 0


def main(args: argparse.Namespace) -> int:
    return asyncio.run(run(args))
