"""Quality of the `transcribe` task (OCR + layout recovery) on held-out pictures.

    python benchmarks/ocr_quality.py [--corpus /work/corpus] [--snippets 6] [--lines 12]
        [--errors all] [--diagrams 30] [--threads 1] [--out results.json]

Three groups, each printed as one JSON line (and a Markdown table on stderr):

code      Code screenshots rendered (models/train/vlm_data.render_code) from windows of
          held-out files (`test.jsonl` of the corpus: split by content hash, never trained
          on) in 3 monospace fonts x 2 sizes (12, 16 px) x light/dark themes, plus, per
          snippet, one configuration also scaled x0.75 and x1.5 and JPEG-compressed
          (quality 55). Metrics, grouped by the effective font size (< 14 px, >= 14 px):
          CER = Levenshtein / reference length on the whole text; exact lines = reference
          lines equal to their aligned transcribed line; indentation exact = of the lines
          whose text was read right, the share with the right leading spaces. "layout" is
          the transcription with indentation / spacing / blank lines recovered from the
          boxes, "plain" is the OCR's rows joined as they are (no recovery); "content CER"
          compares both sides with indentation and repeated spaces removed (what the OCR
          read, apart from layout). Also the language guessed from the transcription.
errors    Real error messages, produced here by running small Python, Java and Node.js
          programs (their real tracebacks / stack traces), drawn (a) as an error dialog with
          the exception line as its message and (b) as a terminal screenshot of the whole
          trace. Metric: the exception type and message found exactly in the transcription
          (whitespace-normalised, since a dialog wraps long messages).
language  The language guessed (server/ocr.guess_language) for 350 held-out windows, as text.
diagrams  Held-out flowcharts of models/train/vlm_data (label words never seen in training):
          the vision model's edge / node F1 with the image only, with the OCR lines in the
          prompt, and with the OCR lines plus the logit bias on their tokens that the
          server adds for `describe-diagram` (the model's `ocr_copy_bias`, or --copy-bias),
          then also with the labels kept to the OCR's words (models/constrain.py) when the
          model asks for it (`ocr_label_constraint`): the server's way. And the share of
          node labels the OCR reads exactly.

Everything runs on `--threads` threads (default 1): OCR (onnxruntime) and the VLM (torch).
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from metrics import levenshtein  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZES = (12, 16)


# -- held-out code ----------------------------------------------------------------------------

def snippets(corpus: Path, n: int, lines: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """n windows of `lines` lines from held-out files, rotating over languages:
    (language, path, text). Printable ASCII only, lines <= 90 columns, common indentation
    removed, trailing spaces dropped (nothing a screenshot shows)."""
    by_lang: dict[str, list[dict[str, str]]] = defaultdict(list)
    with (corpus / "test.jsonl").open(encoding="utf-8") as f:
        for row in f:
            d = json.loads(row)
            by_lang[d["lang"]].append(d)
    rng = random.Random(seed)
    langs = sorted(by_lang)
    rng.shuffle(langs)
    out: list[tuple[str, str, str]] = []
    tries = 0
    while len(out) < n and tries < 20 * n:
        tries += 1
        lang = langs[len(out) % len(langs)]
        d = rng.choice(by_lang[lang])
        src = d["text"].expandtabs(4).split("\n")
        if len(src) < lines + 2:
            continue
        start = rng.randrange(0, len(src) - lines)
        win = [ln.rstrip() for ln in src[start:start + lines]]
        while win and not win[0].strip():
            win.pop(0)
        while win and not win[-1].strip():
            win.pop()
        text = textwrap.dedent("\n".join(win))
        body = [ln for ln in text.split("\n") if ln.strip()]
        if (len(body) < lines // 2 or any(len(ln) > 90 for ln in body)
                or not all(32 <= ord(c) < 127 for c in text.replace("\n", ""))
                or sum(len(ln.strip()) < 2 for ln in body) > len(body) // 3):
            continue
        out.append((lang, d["path"], text))
    return out


def variants(img) -> dict[str, Any]:
    from PIL import Image

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=55)
    w, h = img.size
    return {"jpeg55": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "x0.75": img.resize((round(w * 0.75), round(h * 0.75)), Image.Resampling.LANCZOS),
            "x1.5": img.resize((round(w * 1.5), round(h * 1.5)), Image.Resampling.LANCZOS)}


def _squash(text: str) -> str:
    return "\n".join(" ".join(ln.split()) for ln in text.split("\n") if ln.strip())


def line_scores(pred: str, ref: str) -> dict[str, float]:
    """Exact lines (aligned by content), and of the lines read right, the share with the
    right indentation."""
    p, r = pred.split("\n"), ref.split("\n")
    exact = sum(b.size for b in difflib.SequenceMatcher(None, r, p, autojunk=False)
                .get_matching_blocks())
    ps, rs = [ln.strip() for ln in p], [ln.strip() for ln in r]
    same, indent_ok = 0, 0
    for b in difflib.SequenceMatcher(None, rs, ps, autojunk=False).get_matching_blocks():
        for k in range(b.size):
            rl, pl = r[b.a + k], p[b.b + k]
            if not rl.strip():
                continue
            same += 1
            indent_ok += (len(rl) - len(rl.lstrip())) == (len(pl) - len(pl.lstrip()))
    nonblank = sum(1 for ln in r if ln.strip())
    return {"exact": exact / max(1, len(r)), "content": same / max(1, nonblank),
            "indent_ok": indent_ok, "indent_n": same}


def eval_code(engine, corpus: Path, n: int, lines: int, fonts: tuple[str, ...]
              ) -> dict[str, Any]:
    from codevista.models.train.vlm_data import render_code
    from codevista.server import ocr

    snips = snippets(corpus, n, lines)
    configs = [(f, s, dark) for f in fonts for s in SIZES for dark in (False, True)]
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    examples: list[dict[str, Any]] = []
    lang_ok = 0
    seconds = []
    for i, (lang, path, text) in enumerate(snips):
        for c, (fnt, size, dark) in enumerate(configs):
            img, ref = render_code(text, fnt, size, dark)
            pics = {"plain": img}
            if c == i % len(configs):
                pics.update(variants(img))
            for var, pic in pics.items():
                t0 = time.perf_counter()
                res = engine.read(pic)
                seconds.append(time.perf_counter() - t0)
                scale = {"x0.75": 0.75, "x1.5": 1.5}.get(var, 1.0)
                group = "ge14" if size * scale >= 14 else "lt14"
                layout = ocr.transcribe(res)
                plain = ocr.transcribe(res, layout=False).text
                for g in (group, f"{'dark' if dark else 'light'}", var, fnt, "all"):
                    a = acc[g]
                    a["cer"].append(levenshtein(layout.text, ref) / len(ref))
                    a["cer_plain"].append(levenshtein(plain, ref) / len(ref))
                    sq = _squash(ref)
                    a["cer_content"].append(levenshtein(_squash(layout.text), sq) / len(sq))
                    ls, lp = line_scores(layout.text, ref), line_scores(plain, ref)
                    a["lines_exact"].append(ls["exact"])
                    a["lines_exact_plain"].append(lp["exact"])
                    a["lines_content"].append(ls["content"])
                    a["indent_ok"].append(ls["indent_ok"])
                    a["indent_n"].append(ls["indent_n"])
                    a["indent_ok_plain"].append(lp["indent_ok"])
                    a["indent_n_plain"].append(lp["indent_n"])
                    a["images"].append(1)
                if var == "plain" and c == 0:
                    lang_ok += layout.language == lang
                if var == "plain" and len(examples) < 40 and layout.text != ref:
                    examples.append({"file": path, "font": fnt, "size": size, "dark": dark,
                                     "ref": ref, "ocr": layout.text})
    out: dict[str, Any] = {}
    for g, a in acc.items():
        k = len(a["images"])
        out[g] = {
            "images": k,
            "cer": round(100 * sum(a["cer"]) / k, 2),
            "cer_plain": round(100 * sum(a["cer_plain"]) / k, 2),
            "cer_content": round(100 * sum(a["cer_content"]) / k, 2),
            "lines_exact": round(100 * sum(a["lines_exact"]) / k, 1),
            "lines_exact_plain": round(100 * sum(a["lines_exact_plain"]) / k, 1),
            "lines_read": round(100 * sum(a["lines_content"]) / k, 1),
            "indent_exact": round(100 * sum(a["indent_ok"]) / max(1, sum(a["indent_n"])), 1),
            "indent_exact_plain": round(100 * sum(a["indent_ok_plain"])
                                        / max(1, sum(a["indent_n_plain"])), 1),
        }
    return {"snippets": len(snips), "languages": sorted({s[0] for s in snips}),
            "fonts": list(fonts), "sizes": list(SIZES), "groups": out,
            "language_guess": round(100 * lang_ok / max(1, len(snips)), 1),
            "seconds_per_image": round(sum(seconds) / max(1, len(seconds)), 2),
            "examples": examples}


def eval_language(corpus: Path, n: int, lines: int) -> dict[str, Any]:
    """The language guess on held-out code windows as they are (text only, no OCR)."""
    from codevista.server.ocr import guess_language

    snips = snippets(corpus, n, lines, seed=1)
    by: dict[str, list[int]] = defaultdict(list)
    for lang, _, text in snips:
        by[lang].append(guess_language(text) == lang)
    return {"windows": len(snips), "accuracy": round(100 * sum(sum(v) for v in by.values())
                                                     / max(1, len(snips)), 1),
            "by_language": {k: round(100 * sum(v) / len(v), 1) for k, v in sorted(by.items())}}


# -- real error messages ----------------------------------------------------------------------

PY_CASES = [
    "1 / 0", "{'host': 1}['port']", "[1, 2, 3][5]", "None.split(',')", "1 + 'a'",
    "int('12a')", "resutl = 1\nprint(result)", "import requets",
    "open('config.yaml')", "def f(x, y): pass\nf(1)", "import json\njson.loads('{bad')",
    "assert len([1]) == 3, 'expected 3 items'", "x = (1, 2)\nx[0] = 5",
    "import math\nmath.sqrt(-1)", "d = {}\nfor k in d: pass\nnext(iter(d))",
]
JAVA_CASES = [
    "int a = 0; System.out.println(10 / a);",
    "String s = null; System.out.println(s.length());",
    "int[] xs = new int[3]; xs[5] = 1;",
    "Integer.parseInt(\"12a\");",
    "Object o = Integer.valueOf(3); String s = (String) o;",
    "java.util.List<Integer> l = java.util.List.of(1, 2); l.add(3);",
    "\"abc\".substring(0, 10);",
    "java.util.Optional.empty().get();",
    "new java.util.ArrayList<String>().iterator().next();",
    "throw new IllegalStateException(\"connection pool is closed\");",
    "java.util.Map<String, Integer> m = new java.util.HashMap<>(); int v = m.get(\"port\");",
    "Thread.sleep(-1);",
]
NODE_CASES = [
    "const user = undefined; user.name;", "totalCount + 1;", "const xs = 5; xs.map(x => x);",
    "new Array(-1);", "JSON.parse('{\"a\": 1,}');", "const k = 1; k = 2;",
    "function f() { return f(); } f();",
    "require('fs').readFileSync('missing.txt');", "require('path').join(undefined);",
    "decodeURIComponent('%');", "Object.keys(null);", "null.length;",
]


def _run(cmd: list[str], cwd: str, timeout: int = 60) -> str:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return p.stdout


def real_errors(which: set[str]) -> list[dict[str, str]]:
    """Tracebacks printed by the real runtimes, and each one's exception line."""
    out: list[dict[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if "python" in which:
            prog = ("import traceback\nfor i, src in enumerate(CASES):\n"
                    "    try:\n        exec(compile(src, 'app.py', 'exec'), {})\n"
                    "    except BaseException:\n"
                    "        print(traceback.format_exc().rstrip() + '\\n\\x00')\n")
            (Path(tmp) / "run.py").write_text(f"CASES = {PY_CASES!r}\n{prog}")
            for tb in _run([sys.executable, "run.py"], tmp).split("\x00")[:-1]:
                tb = tb.strip("\n")
                out.append({"runtime": "python", "title": "Python", "trace": tb,
                            "exception": tb.split("\n")[-1]})
        if "java" in which and shutil.which("java"):
            body = "\n".join(f"try {{ case{i}(); }} catch (Throwable e) {{ e.printStackTrace(); "
                             "System.err.flush(); System.out.println(\"\\u0000\"); }"
                             for i in range(len(JAVA_CASES)))
            cases = "\n".join(f"static void case{i}() throws Exception {{ {c} }}"
                              for i, c in enumerate(JAVA_CASES))
            (Path(tmp) / "Main.java").write_text(
                "public class Main {\n" + cases + "\npublic static void main(String[] a) "
                "throws Exception {\nSystem.setErr(System.out);\n" + body + "\n}\n}\n")
            for tb in _run(["java", "Main.java"], tmp).split("\x00")[:-1]:
                tb = tb.strip("\n")
                first = tb.split("\n")[0]
                out.append({"runtime": "java", "title": "Java",
                            "trace": 'Exception in thread "main" ' + tb, "exception": first})
        if "node" in which and shutil.which("node"):
            cases = json.dumps(NODE_CASES)
            (Path(tmp) / "run.js").write_text(
                f"for (const src of {cases}) {{ try {{ new Function('require', src)(require); }}"
                " catch (e) { console.log(e.stack + '\\n\\u0000'); } }\n")
            for tb in _run(["node", "run.js"], tmp).split("\x00")[:-1]:
                tb = tb.strip("\n")
                out.append({"runtime": "node", "title": "Node.js", "trace": tb,
                            "exception": tb.split("\n")[0]})
    return out


def eval_errors(engine, which: set[str]) -> dict[str, Any]:
    from codevista.models.train.vlm_data import render_code, render_dialog
    from codevista.server import ocr

    errs = real_errors(which)
    hits: dict[str, list[int]] = defaultdict(list)
    misses: list[dict[str, str]] = []
    for e in errs:
        trace_lines = [ln for ln in e["trace"].split("\n") if ln.strip()][:10]
        if e["exception"] not in trace_lines:  # the exception line must be in the picture
            trace_lines = trace_lines[:9] + [e["exception"]]
        message = (e["trace"].split("\n")[0] if e["runtime"] == "java" else e["exception"])
        pics = {"dialog": render_dialog(f"{e['title']} error", message)[0],
                "terminal": render_code("\n".join(trace_lines), "DejaVuSansMono.ttf", 14,
                                        dark=True)[0]}
        for kind, pic in pics.items():
            got = ocr.transcribe(engine.read(pic))
            found = " ".join(e["exception"].split()) in " ".join(got.text.split())
            for g in (kind, e["runtime"], "all"):
                hits[g].append(found)
            if not found and len(misses) < 20:
                misses.append({"kind": kind, "exception": e["exception"], "ocr": got.text})
    return {"messages": len(errs),
            "by_runtime": {r: sum(e["runtime"] == r for e in errs) for r in sorted(which)},
            "exception_exact": {g: round(100 * sum(v) / len(v), 1) for g, v in hits.items()},
            "misses": misses}


# -- diagrams with and without OCR input ------------------------------------------------------

def eval_diagrams(engine, model_dir: Path, n: int, copy_bias: float | None = None
                  ) -> dict[str, Any]:
    from codevista.models import formats
    from codevista.models.constrain import DiagramLabels
    from codevista.models.engine import Engine, SamplingParams
    from codevista.models.loader import load_model
    from codevista.models.train.vlm_data import sample
    from codevista.server.features.vision import ocr_copy_bias, ocr_label_constraint, ocr_logit_bias
    from vision_quality import f1, parse_diagram

    loaded = load_model(model_dir)
    vision = loaded.vision
    if vision is None:
        raise SystemExit(f"{model_dir} is not a vision model")
    image_tok = loaded.tokenizer.tok.id_to_token(vision.image_token_id)
    bias = ocr_copy_bias(loaded) if copy_bias is None else copy_bias
    constrained = ocr_label_constraint(loaded)
    scores: dict[str, list[float]] = defaultdict(list)
    label_read: list[float] = []
    seed = 1_000_000
    with Engine(loaded) as eng:
        while len(scores["edges_image"]) < n and seed < 1_000_000 + 200 * n:
            s = sample("test", seed)
            seed += 1
            if s.kind != "diagram":
                continue
            res = engine.read(s.image)
            read = {t.strip() for t, _ in res.boxes_1000()}
            label_read.append(len(read & set(s.meta["nodes"])) / len(s.meta["nodes"]))
            q = formats.vision_question(s.task, s.question)
            lines = res.boxes_1000()
            ctx = formats.ocr_context(lines)
            copy = ocr_logit_bias(loaded.tokenizer, lines, bias)
            modes = [("image", "", (), None), ("ocr", ctx, (), None)]
            if bias > 0:  # OCR lines and the copy bias on their tokens
                modes.append(("ocr_copy", ctx, copy, None))
            if constrained:  # as the server asks: and the labels kept to them
                modes.append(("ocr_labels", ctx, copy, DiagramLabels(
                    loaded.tokenizer, [t for t, _ in lines]) if lines else None))
            for mode, ctx, logit_bias, constraint in modes:
                ids = loaded.tokenizer.encode(formats.vision_prompt(q, image_tok, ctx),
                                              add_special_tokens=False)
                out = eng.generate(ids, SamplingParams(max_new_tokens=96,
                                                       logit_bias=logit_bias,
                                                       constraint=constraint),
                                   images=[vision.preprocess(s.image)]).text.strip()
                nodes, edges = parse_diagram(out)
                scores[f"edges_{mode}"].append(f1(edges, set(map(tuple, s.meta["edges"]))))
                scores[f"nodes_{mode}"].append(f1(nodes, set(s.meta["nodes"])))
    r = {k: round(100 * sum(v) / len(v), 1) for k, v in scores.items() if v}
    r["labels_read_by_ocr"] = round(100 * sum(label_read) / max(1, len(label_read)), 1)
    r["diagrams"] = len(label_read)
    r["copy_bias"] = bias
    r["label_constraint"] = constrained
    return r


# -- report -----------------------------------------------------------------------------------

def markdown(code: dict[str, Any] | None, errors: dict[str, Any] | None,
             diagrams: dict[str, Any] | None) -> str:
    out = []
    if code:
        g = code["groups"]
        out += ["| code screenshots (held-out) | images | CER layout / plain | exact lines "
                "layout / plain | indentation exact layout / plain |", "|---|---|---|---|---|"]
        for k in ("ge14", "lt14", "light", "dark", "jpeg55", "x0.75", "x1.5", *code["fonts"],
                  "all"):
            if k in g:
                m = g[k]
                out.append(f"| {k} | {m['images']} | {m['cer']} % / {m['cer_plain']} % | "
                           f"{m['lines_exact']} % / {m['lines_exact_plain']} % | "
                           f"{m['indent_exact']} % / {m['indent_exact_plain']} % |")
        out.append(f"\nlanguage guessed right: {code['language_guess']} % of "
                   f"{code['snippets']} snippets; {code['seconds_per_image']} s per image\n")
    if errors:
        e = errors["exception_exact"]
        out += ["| error pictures | exception type + message exact |", "|---|---|"]
        out += [f"| {k} | {v} % |" for k, v in sorted(e.items())]
        out.append("")
    if diagrams:
        d = diagrams
        out += [f"diagrams ({d['diagrams']}): edge F1 image only {d.get('edges_image')} / "
                f"with OCR {d.get('edges_ocr')}; node F1 {d.get('nodes_image')} / "
                f"{d.get('nodes_ocr')}; labels read by OCR {d['labels_read_by_ocr']} %"]
        if "edges_ocr_copy" in d:
            out += [f"with OCR and the copy bias {d['copy_bias']}: edge F1 "
                    f"{d['edges_ocr_copy']}, node F1 {d['nodes_ocr_copy']}"]
        if "edges_ocr_labels" in d:
            out += [f"and the labels kept to the OCR's words (as the server asks): edge F1 "
                    f"{d['edges_ocr_labels']}, node F1 {d['nodes_ocr_labels']}"]
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=Path("/work/corpus"),
                   help="folder with test.jsonl (held-out files)")
    p.add_argument("--snippets", type=int, default=6, help="code windows (x 12 pictures + 3)")
    p.add_argument("--lines", type=int, default=12, help="lines per code window")
    p.add_argument("--fonts", default="DejaVuSansMono.ttf,LiberationMono-Regular.ttf,"
                   "DejaVuSansMono-Bold.ttf")
    p.add_argument("--errors", default="python,java,node",
                   help="runtimes whose real errors to draw ('' for none)")
    p.add_argument("--diagrams", type=int, default=30, help="0 to skip")
    p.add_argument("--copy-bias", type=float, default=None,
                   help="logit bias on the OCR lines' tokens (default: the model's "
                        "`ocr_copy_bias`, as the server uses it)")
    p.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "vlm")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    import torch
    from codevista.server import ocr

    ocr.require("benchmark")
    torch.set_num_threads(args.threads)
    engine = ocr.OcrEngine(threads=args.threads)
    t0 = time.time()
    results: dict[str, Any] = {}
    code = errors = diagrams = None
    if args.snippets > 0:
        code = eval_code(engine, args.corpus, args.snippets, args.lines,
                         tuple(args.fonts.split(",")))
        print(json.dumps({"group": "code", **{k: v for k, v in code.items()
                                              if k != "examples"}}), flush=True)
    language = eval_language(args.corpus, 350, args.lines)
    print(json.dumps({"group": "language", **language}), flush=True)
    if args.errors:
        errors = eval_errors(engine, set(args.errors.split(",")))
        print(json.dumps({"group": "errors", **{k: v for k, v in errors.items()
                                                if k != "misses"}}), flush=True)
    if args.diagrams > 0:
        diagrams = eval_diagrams(engine, args.model, args.diagrams, args.copy_bias)
        print(json.dumps({"group": "diagrams", **diagrams}), flush=True)
    results = {"code": code, "language": language, "errors": errors, "diagrams": diagrams,
               "seconds": round(time.time() - t0, 1)}
    print(json.dumps({"group": "total", "seconds": results["seconds"]}))
    print(markdown(code, errors, diagrams), file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
