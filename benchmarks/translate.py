"""Translation quality of any checkpoint, through the server's own translation path.

    python benchmarks/translate.py [--model DIR] [--skip codexglue,humaneval]
        [--codexglue-limit N] [--humaneval-limit N] [--sources python,java,...]
        [--targets ...] [--perfect] [--out results.json] [--markdown results.md]

Every translation goes through `TranslationService` (server/features/translate.py) on the
in-process engine: the prompt style of the model's family, splitting, clean-up and
stopping are exactly what an editor gets. Greedy decoding, so pass@1 is the share passed.

codexglue  Java -> C# and C# -> Java on CodeXGLUE `valid.*` (one function per line; all
           499 pairs unless --codexglue-limit). The prediction's whitespace runs are
           collapsed to single spaces (the references are one whitespace-tokenized line);
           exact match of the stripped strings and corpus BLEU-4 x 100 as CodeXGLUE's
           evaluator computes them (metrics.py), beside the naive-copy baseline.
humaneval  HumanEval-X: each problem's canonical solution (declaration plus body) in the
           source language is translated to the target language; the program (target
           imports + translation + the target's tests) is compiled and run in a sandbox
           (benchmarks/humaneval_x.py). pass@1 per direction, as a matrix. Targets whose
           toolchain is absent are reported as skipped. --perfect replaces the model by
           the target's own canonical solution: the harness must then score 100 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import humaneval_x as hx  # noqa: E402
from metrics import bleu_strings, exact_match  # noqa: E402

DATA = hx.shared_data()
CODEXGLUE_ROWS = {  # published test-split rows, CodeXGLUE README (for orientation only)
    "java->csharp": {"naive copy": (18.54, 0.0), "PBSMT": (43.53, 12.5),
                     "Transformer": (55.84, 33.0), "CodeBERT": (79.92, 59.0)},
    "csharp->java": {"naive copy": (18.69, 0.0), "PBSMT": (40.06, 16.1),
                     "Transformer": (50.47, 37.9), "CodeBERT": (72.14, 58.0)},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Translator:
    """The server's translation service on a locally loaded model."""

    def __init__(self, model: str | None) -> None:
        from codevista.server.backend import LocalBackend
        from codevista.server.features.translate import TranslationService

        self.loop = asyncio.new_event_loop()
        self.backend = LocalBackend()
        self.loop.run_until_complete(self.backend.load(model, "float32", lambda m: None))
        if self.backend.state != "ready":
            raise SystemExit(f"model did not load: {self.backend.error}")
        self.service = TranslationService(self.backend)
        self.name = self.backend.model_name

    def __call__(self, code: str, source: str, target: str) -> str:
        from codevista.server.translation import resolve_language

        result = self.loop.run_until_complete(self.service.translate(
            code, resolve_language(source), resolve_language(target)))
        return result.text

    def close(self) -> None:
        self.backend.close()
        self.loop.close()


def codexglue(translate: Translator, limit: int | None) -> dict[str, Any]:
    pairs_dir = DATA / "codexglue-java-cs"
    java = (pairs_dir / "valid.java-cs.txt.java").read_text(encoding="utf-8").splitlines()
    cs = (pairs_dir / "valid.java-cs.txt.cs").read_text(encoding="utf-8").splitlines()
    pairs = list(zip(java, cs, strict=True))[:limit]
    out: dict[str, Any] = {}
    for src, tgt, key in (("java", "csharp", "java->csharp"), ("csharp", "java", "csharp->java")):
        refs, preds, copies = [], [], []
        t0 = time.time()
        for i, (j, c) in enumerate(pairs):
            source, ref = (j, c) if src == "java" else (c, j)
            pred = " ".join(translate(source.strip(), src, tgt).split())
            refs.append(ref.strip())
            preds.append(pred)
            copies.append(source.strip())
            if (i + 1) % 50 == 0:
                log(f"codexglue {key}: {i + 1}/{len(pairs)} ({time.time() - t0:.0f} s)")
        out[key] = {
            "pairs": len(pairs),
            "bleu": round(bleu_strings(refs, preds), 2),
            "exact_match": round(100 * sum(map(exact_match, preds, refs)) / len(pairs), 2),
            "naive_copy_bleu": round(bleu_strings(refs, copies), 2),
            "naive_copy_exact_match": round(
                100 * sum(map(exact_match, copies, refs)) / len(pairs), 2),
            "seconds": round(time.time() - t0, 1),
            "examples": [{"source": (j if src == "java" else c)[:300], "reference": r[:300],
                          "prediction": p[:300]} for (j, c), r, p in
                         list(zip(pairs, refs, preds, strict=True))[:3]],
        }
        log(f"codexglue {key}: BLEU {out[key]['bleu']} EM {out[key]['exact_match']}")
    return out


def humaneval(translate: Translator | None, sources: list[str], targets: list[str],
              limit: int | None) -> dict[str, Any]:
    problems = hx.load_problems(DATA / "humaneval-x")
    sandbox = hx.Sandbox()
    tools = hx.toolchains()
    result: dict[str, Any] = {"network_isolated": sandbox.network_isolated,
                              "skipped_targets": {t: tools[t] for t in targets if tools[t]},
                              "unrunnable": {}, "matrix": {}}
    for tgt in targets:
        result["unrunnable"][tgt] = {
            p.task: why for p in problems[tgt].values()
            if (why := hx.unrunnable_reason(p)) is not None}
    pool = ThreadPoolExecutor(2)
    for src in sources:
        for tgt in targets:
            if src == tgt or tools[tgt]:
                continue
            numbers = sorted(n for n, p in problems[tgt].items() if hx.runnable(p)
                             and n in problems[src])[:limit]
            t0 = time.time()
            futures = []
            for n in numbers:
                target = problems[tgt][n]
                text = target.source if translate is None else translate(
                    problems[src][n].source, src, tgt)
                futures.append(pool.submit(hx.check, sandbox, target, text))
            outcomes = [f.result() for f in futures]
            passed = sum(o.passed for o in outcomes)
            stages: dict[str, int] = {}
            for o in outcomes:
                stages[o.stage] = stages.get(o.stage, 0) + 1
            result["matrix"][f"{src}->{tgt}"] = {
                "problems": len(numbers), "passed": passed,
                "pass@1": round(100 * passed / max(1, len(numbers)), 1), "stages": stages,
                "seconds": round(time.time() - t0, 1)}
            log(f"humaneval-x {src}->{tgt}: {passed}/{len(numbers)} passed {stages} "
                f"({time.time() - t0:.0f} s)")
    pool.shutdown()
    return result


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Model: {results['model']}", ""]
    cg = results.get("codexglue")
    if cg:
        lines += ["| CodeXGLUE valid | BLEU | EM % | naive copy BLEU / EM |",
                  "|---|---|---|---|"]
        for key, r in cg.items():
            lines.append(f"| {key} ({r['pairs']} pairs) | {r['bleu']} | {r['exact_match']} | "
                         f"{r['naive_copy_bleu']} / {r['naive_copy_exact_match']} |")
        lines.append("")
    he = results.get("humaneval")
    if he:
        srcs = sorted({k.split("->")[0] for k in he["matrix"]})
        tgts = sorted({k.split("->")[1] for k in he["matrix"]})
        lines += ["HumanEval-X pass@1 % (rows: source, columns: target; greedy)", "",
                  "| from \\ to | " + " | ".join(tgts) + " |",
                  "|---|" + "---|" * len(tgts)]
        for s in srcs:
            cells = []
            for t in tgts:
                r = he["matrix"].get(f"{s}->{t}")
                cells.append("—" if r is None else f"{r['pass@1']} ({r['passed']}/{r['problems']})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
        for t, why in he["skipped_targets"].items():
            lines.append(f"- target {t} skipped: {why}")
        for t, tasks in he["unrunnable"].items():
            if tasks:
                lines.append(f"- {t}: {len(tasks)} problems not judged here "
                             f"({'; '.join(sorted(set(tasks.values())))})")
        lines.append(f"- sandbox network isolation: {he['network_isolated']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: embedded)")
    p.add_argument("--skip", default="", help="comma-separated: codexglue,humaneval")
    p.add_argument("--codexglue-limit", type=int, default=None)
    p.add_argument("--humaneval-limit", type=int, default=None)
    p.add_argument("--sources", default="python,cpp,java,javascript,go,rust")
    p.add_argument("--targets", default="python,cpp,java,javascript,go,rust")
    p.add_argument("--perfect", action="store_true",
                   help="judge the targets' canonical solutions instead of a model's output")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    translate = None if args.perfect else Translator(args.model)
    results: dict[str, Any] = {"model": "perfect translator (canonical solutions)"
                               if translate is None else translate.name}
    try:
        if "codexglue" not in skip and translate is not None:
            results["codexglue"] = codexglue(translate, args.codexglue_limit)
            print(json.dumps({"codexglue": {k: {m: v for m, v in r.items() if m != "examples"}
                                            for k, r in results["codexglue"].items()}}))
        if "humaneval" not in skip:
            results["humaneval"] = humaneval(translate, args.sources.split(","),
                                             args.targets.split(","), args.humaneval_limit)
            print(json.dumps({"humaneval": {k: v["pass@1"] for k, v in
                                            results["humaneval"]["matrix"].items()}}))
    finally:
        if translate is not None:
            translate.close()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    md = markdown(results)
    if args.markdown:
        args.markdown.write_text(md)
    print(md, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
