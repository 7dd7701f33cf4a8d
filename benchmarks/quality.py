"""Quality of the embedded code model, measured honestly: held-out data, greedy, seeded.

    python benchmarks/quality.py --model DIR [--corpus /work/corpus] [--samples N]
        [--langs python,java,...] [--skip bpb,line,fim,translate] [--translation-limit N]
        [--seed 0] [--out results.json] [--markdown results.md]

Prompts are built only with `codevista.models.formats` (the very functions training and
serving use) and tokenized without added BOS/EOS tokens, as in training. Everything is
deterministic: greedy decoding, a seeded RNG per language and metric group.

Metric groups (one JSON line each on stdout; all of them in --out; a table in --markdown):

bpb        Bits per byte on the held-out files (`test.jsonl` of --corpus). Per language the
           files are shuffled with the seed and taken until --bpb-bytes UTF-8 bytes (the file
           that crosses the budget is cut at a line end and gets no EOT). Each file is
           `plain(lang, text) + EOT`, tokenized and split into non-overlapping windows of
           min(max_position_embeddings, 1024) tokens; every window is scored on its own
           (no carried context) and its first token is not scored. bits = sum(NLL) / ln 2;
           bytes = the UTF-8 bytes of the scored tokens, taken from the byte-level BPE
           vocabulary (each token's raw bytes; special tokens count 0 bytes but their NLL,
           e.g. of the final EOT, is counted), falling back to len(decode([id]).encode())
           for tokens that are not byte-level. Also reported: bits per token, and bits per
           byte with "tagged" windows: after a file's first window, every window is one
           token shorter and starts with the language tag (not scored), as every prompt the
           server sends starts with it; a model trained only on tagged text is lost without.
line       Single-line completion, CodeXGLUE line-level style. Per language --samples cut
           points: a line with >= 8 non-space characters is drawn (uniformly over all such
           lines of the language's held-out files) and cut at a random column between the
           end of its indentation and 3 characters before its (right-stripped) end. Prompt:
           the token ids of `plain(lang, text_before_cut)` left-truncated to --context tokens
           (default: the model's `codevista_prompt_tokens`, else 768),
           keeping the language tag ids at the front. Greedy, stop at "\\n", at most 48 new
           tokens. Target: the rest of the line, right-stripped. Exact match: the stripped
           strings are equal; edit similarity: 100 * (1 - Levenshtein / max length) of the
           stripped strings. Baseline: the previous non-blank line from the same column on.
           Also "healed": the same cut asked as the server asks it (token healing: the
           prefix's last token is dropped from the prompt and regenerated, constrained to
           reproduce it; the prediction is what follows it).
fim        Single-line infilling at the same cut points: prefix = up to --fim-prefix-chars
           characters before the cut, suffix = up to --fim-suffix-chars characters from the
           end of the cut line (it starts with that line's "\\n"), as `fim_psm` and, separately,
           `fim_spm` (budgets by characters, about 512 and 256 tokens; halved until the prompt
           fits the context). Greedy until EOT or "\\n", at most 48 tokens. Target: the rest
           of the line. Exact match and edit similarity as for `line`. Also "end":
           `fim_spm` with an empty suffix, the prompt the server sends when nothing
           follows the cursor (the user writing at the end of a file). Also "server": the
           cut asked exactly as the language server asks it while the line is being typed
           (the rest of the cut line removed from the document, the cursor at the cut;
           `build_prompt` with its budget, file path and token healing; the family's stop
           tokens, no stop string: the healed text may hold a newline), the prediction
           being the first line of what follows the healed text.
translate  Java -> C# and C# -> Java on CodeXGLUE valid (all 499 pairs unless
           --translation-limit). Prompt `translation(src, source, tgt)`, greedy until EOT,
           max_new_tokens = 2 * source tokens + 16 (clamped to the context; a prompt that does
           not fit counts as an empty prediction). The prediction is what the server would
           keep: the stream read token by token through its `OutputCutter` (as many
           definitions as the source, a loop cut to one copy), then `clean_output`; also
           reported: BLEU of the raw output and of the old cut at the first definition's
           closing brace. Exact match of the stripped strings and
           corpus BLEU-4 x 100 on whitespace tokens, smoothed as tensorflow/nmt
           compute_bleu(smooth=True) (see metrics.py), beside the published CodeXGLUE rows
           (those are on the *test* split, which codevista does not have) and the naive copy
           baseline computed here on the same valid pairs.

A few real completions (some right, some wrong) are kept under "examples" in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from codevista.models import formats
from codevista.models.engine import Engine, SamplingParams
from codevista.models.kv_cache import KVCache
from codevista.models.loader import LoadedModel, load_model
from codevista.models.train.data import read_pairs
from codevista.server.postprocess import end_of_definition
from codevista.server.prompts import healing_text
from codevista.server.translation import OutputCutter, clean_output, count_blocks, resolve_language
from metrics import bleu_strings, edit_similarity, exact_match

GROUPS = ("bpb", "line", "fim", "translate")
DEFAULT_LANGS = ("python", "java", "go", "rust", "c", "cpp", "typescript", "javascript")
DEFAULT_PAIRS = Path("/work/shared/data/codexglue-java-cs")
LINE_MAX_NEW = 48
MIN_NONSPACE = 8
MIN_LEFT = 3
PROGRESS_EVERY = 50

# CodeXGLUE code-to-code translation, published results on the test split (BLEU, accuracy),
# as listed in shared/data/README.md.
PUBLISHED = {
    "java->csharp": [("naive copy", 18.54, 0.0), ("PBSMT", 43.53, 12.5),
                     ("Transformer (from scratch)", 55.84, 33.0), ("CodeBERT", 79.92, 59.0)],
    "csharp->java": [("naive copy", 18.69, 0.0), ("PBSMT", 40.06, 16.1),
                     ("Transformer (from scratch)", 50.47, 37.9), ("CodeBERT", 72.14, 58.0)],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    def __init__(self, label: str, total: int, every: int = PROGRESS_EVERY) -> None:
        self.label, self.total, self.every = label, total, every
        self.count = 0
        self.t0 = time.monotonic()

    def tick(self) -> None:
        self.count += 1
        if self.count % self.every == 0 or self.count == self.total:
            log(f"  {self.label}: {self.count}/{self.total} "
                f"({time.monotonic() - self.t0:.0f} s)")


def pct(num: float, den: int) -> float:
    return round(100.0 * num / den, 2) if den else 0.0


# -- data -------------------------------------------------------------------------------

def read_test(corpus: Path) -> dict[str, list[dict[str, str]]]:
    by_lang: dict[str, list[dict[str, str]]] = {}
    with (corpus / "test.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            by_lang.setdefault(row["lang"], []).append(row)
    return by_lang


@dataclass(frozen=True)
class CutPoint:
    lang: str
    path: str
    text: str  # the whole file
    cut: int  # absolute offset of the cursor
    line_end: int  # offset of the "\n" ending the cut line (or len(text))
    target: str  # rest of the line, right-stripped
    baseline: str  # previous non-blank line from the same column, right-stripped

    @property
    def before(self) -> str:
        return self.text[:self.cut]


def cut_points(lang: str, rows: list[dict[str, str]], n: int, rng: random.Random
               ) -> list[CutPoint]:
    candidates: list[tuple[int, int, int]] = []  # (file, line start, line number)
    split_rows = [row["text"].split("\n") for row in rows]
    for fi, lines in enumerate(split_rows):
        pos = 0
        for li, line in enumerate(lines):
            if sum(not c.isspace() for c in line) >= MIN_NONSPACE:
                candidates.append((fi, pos, li))
            pos += len(line) + 1
    out = []
    for fi, start, li in rng.sample(candidates, min(n, len(candidates))):
        lines = split_rows[fi]
        line = lines[li].rstrip()
        indent = len(line) - len(line.lstrip())
        col = rng.randint(indent, len(line) - MIN_LEFT)
        prev = next((lines[j] for j in range(li - 1, -1, -1) if lines[j].strip()), "")
        text = rows[fi]["text"]
        out.append(CutPoint(lang=lang, path=rows[fi].get("path", ""), text=text,
                            cut=start + col, line_end=start + len(lines[li]),
                            target=line[col:], baseline=prev[col:].rstrip()))
    return out


# -- byte lengths of tokens ---------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_CHARS = frozenset(_bytes_to_unicode().values())


class TokenBytes:
    """UTF-8 byte length of each token id (0 for special tokens)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.tok = loaded.tokenizer
        self.cache: dict[int, int] = {}

    def __call__(self, tid: int) -> int:
        n = self.cache.get(tid)
        if n is None:
            n = self.cache[tid] = self._length(tid)
        return n

    def _length(self, tid: int) -> int:
        if tid in self.tok.special_ids:
            return 0
        piece = self.tok.tok.id_to_token(tid)
        if piece is None:
            return 0
        if all(c in _BYTE_CHARS for c in piece):
            return len(piece)  # one character per raw byte
        return len(self.tok.decode([tid]).encode("utf-8"))


# -- the harness --------------------------------------------------------------------------

class Harness:
    def __init__(self, loaded: LoadedModel, args: argparse.Namespace) -> None:
        self.loaded = loaded
        self.args = args
        self.tok = loaded.tokenizer
        self.max_positions = loaded.model.max_positions
        eot = self.tok.token_to_id(formats.EOT)
        missing = [t for t in formats.SPECIAL_TOKENS if self.tok.token_to_id(t) is None]
        if missing or eot is None:
            raise SystemExit(f"the tokenizer of {loaded.path} lacks the codevista special "
                             f"tokens {missing}: it is not a codevista model")
        self.stop_ids = tuple(sorted(set(loaded.stop_token_ids) | {eot}))
        self.engine: Engine | None = None
        self.examples: list[dict[str, Any]] = []

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def generate(self, ids: list[int], max_new: int, stop: tuple[str, ...],
                 required_prefix: str = "") -> str:
        return self.generate_ids(ids, max_new, stop, required_prefix).text

    def generate_ids(self, ids: list[int], max_new: int, stop: tuple[str, ...],
                     required_prefix: str = "") -> Any:
        assert self.engine is not None
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0, stop=stop,
                                stop_token_ids=self.stop_ids, required_prefix=required_prefix)
        result = self.engine.generate(ids, params)
        if result.finish_reason == "error":
            raise RuntimeError(f"generation failed: {result.error}")
        return result

    def served_translation(self, token_ids: list[int], source: str, src_lang: str,
                           tgt_lang: str) -> str:
        """What the server's translation keeps of this generation: it reads the stream
        token by token through `OutputCutter` (as many definitions as the source holds,
        loops cut to one copy), stops at the first complete cut, then `clean_output`."""
        src, tgt = resolve_language(src_lang, "source"), resolve_language(tgt_lang)
        cutter = OutputCutter(tgt, count_blocks(source, src))
        kept = ""
        for k in range(1, len(token_ids) + 1):
            kept, complete = cutter.cut(self.tok.decode(token_ids[:k]))
            if complete:
                break
        return clean_output(kept, final=True).strip()

    # -- bits per byte ------------------------------------------------------------------
    def bpb(self, by_lang: dict[str, list[dict[str, str]]], langs: list[str]) -> dict[str, Any]:
        cfg = self.loaded.config
        window = min(cfg.max_position_embeddings, 1024, self.max_positions)
        token_bytes = TokenBytes(self.loaded)
        per_lang: dict[str, Any] = {}
        budget = self.args.bpb_bytes
        for lang in langs:
            rows = list(by_lang.get(lang, []))
            if not rows:
                per_lang[lang] = {"files": 0, "note": "no held-out files"}
                continue
            random.Random(f"{self.args.seed}:bpb:{lang}").shuffle(rows)
            texts: list[tuple[str, bool]] = []  # (text, whole file)
            used = 0
            for row in rows:
                if used >= budget:
                    break
                raw = row["text"].encode("utf-8")
                if used + len(raw) <= budget:
                    texts.append((row["text"], True))
                    used += len(raw)
                    continue
                part = raw[:budget - used].decode("utf-8", errors="ignore")
                part = part[:part.rfind("\n") + 1] or part
                texts.append((part, False))
                used += len(part.encode("utf-8"))
                break
            seqs = [self.encode(formats.plain(lang, t) + (formats.EOT if whole else ""))
                    for t, whole in texts]
            total_windows = sum(math.ceil(len(s) / window) for s in seqs)
            progress = Progress(f"bpb {lang}", total_windows)
            tag = self.encode(formats.plain(lang, ""))  # the language tag of every prompt
            nll = nll_tagged = 0.0
            scored_bytes = scored_tokens = tagged_bytes = 0
            for ids in seqs:
                for s in range(0, len(ids), window):
                    win = ids[s:s + window]
                    progress.tick()
                    if len(win) < 2:
                        continue
                    nll += self.window_nll(win, 1)
                    scored_tokens += len(win) - 1
                    scored_bytes += sum(token_bytes(t) for t in win[1:])
                # "tagged": the windows after a file's first one begin with the language
                # tag, as every prompt of the server does (one tag shorter; tag not scored)
                first = ids[:window]
                if len(first) > 1 and tag and len(tag) < window:
                    nll_tagged += self.window_nll(first, 1)
                    tagged_bytes += sum(token_bytes(t) for t in first[1:])
                    step = window - len(tag)
                    for s in range(window, len(ids), step):
                        win = ids[s:s + step]
                        if len(win) < 2:
                            continue
                        nll_tagged += self.window_nll(tag + win, len(tag) + 1)
                        tagged_bytes += sum(token_bytes(t) for t in win[1:])
            bits = nll / math.log(2)
            per_lang[lang] = {
                "files": len(texts), "text_bytes": used, "scored_bytes": scored_bytes,
                "scored_tokens": scored_tokens, "bits": round(bits, 1),
                "bpb": round(bits / scored_bytes, 4) if scored_bytes else None,
                "bits_per_token": round(bits / scored_tokens, 4) if scored_tokens else None,
                "bpb_tagged": (round(nll_tagged / math.log(2) / tagged_bytes, 4)
                               if tagged_bytes else None)}
        done = [v for v in per_lang.values() if v.get("bpb") is not None]
        return {"metric": "bpb", "window": window, "budget_bytes_per_lang": budget,
                "per_lang": per_lang,
                "macro_bpb": (round(sum(v["bpb"] for v in done) / len(done), 4)
                              if done else None),
                "micro_bpb": (round(sum(v["bits"] for v in done)
                                    / sum(v["scored_bytes"] for v in done), 4)
                              if done else None),
                "macro_bpb_tagged": (round(sum(v["bpb_tagged"] for v in done) / len(done), 4)
                                     if done and all(v["bpb_tagged"] for v in done) else None)}

    def window_nll(self, ids: list[int], first_scored: int) -> float:
        """Negative log-likelihood (nats) of ids[first_scored:] given what precedes them,
        in one forward pass from an empty cache."""
        cfg, model = self.loaded.config, self.loaded.model
        cache = KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, len(ids), model.dtype,
                        model.device)
        x = torch.tensor(ids, dtype=torch.long, device=model.device)
        logits = model(x, cache, 0, all_logits=True)
        logp = torch.log_softmax(logits[first_scored - 1:-1].float(), dim=-1)
        return -logp.gather(1, x[first_scored:, None]).sum().item()

    # -- single-line completion -----------------------------------------------------------
    def line_prompt(self, cp: CutPoint, before: str | None = None) -> list[int]:
        tag = self.encode(formats.plain(cp.lang, ""))
        full = self.encode(formats.plain(cp.lang, cp.before if before is None else before))
        if full[:len(tag)] != tag:
            raise RuntimeError("the language tag does not tokenize on its own")
        budget = min(self.args.context, self.max_positions - LINE_MAX_NEW) - len(tag)
        code = full[len(tag):]
        return tag + code[max(0, len(code) - budget):]

    def line(self, points: dict[str, list[CutPoint]]) -> dict[str, Any]:
        per_lang: dict[str, Any] = {}
        candidates: dict[str, list[dict[str, Any]]] = {}
        progress = Progress("line", sum(len(v) for v in points.values()))
        for lang, cps in points.items():
            em = es = bem = bes = hem = hes = 0.0
            for cp in cps:
                pred = self.generate(self.line_prompt(cp), LINE_MAX_NEW, ("\n",))
                ok = exact_match(pred, cp.target)
                em += ok
                es += edit_similarity(pred.strip(), cp.target.strip())
                # as the server asks: the cut token healed (regenerated, constrained)
                heal = healing_text(self.tok, cp.before)
                # a healed token holding a newline (indentation after one) would meet the
                # stop string before the prediction starts: then stop nowhere, cut after
                out = self.generate(self.line_prompt(cp, cp.before[:len(cp.before) - len(heal)]),
                                    LINE_MAX_NEW, () if "\n" in heal else ("\n",),
                                    required_prefix=heal)
                healed = (out[len(heal):] if out.startswith(heal) else out).split("\n", 1)[0]
                hem += exact_match(healed, cp.target)
                hes += edit_similarity(healed.strip(), cp.target.strip())
                bem += exact_match(cp.baseline, cp.target)
                bes += edit_similarity(cp.baseline.strip(), cp.target.strip())
                candidates.setdefault(lang, []).append({
                    "task": "line", "lang": lang, "path": cp.path,
                    "prompt_tail": "\n".join(cp.before.split("\n")[-4:])[-400:],
                    "prediction": pred, "target": cp.target, "exact_match": ok})
                progress.tick()
            n = len(cps)
            per_lang[lang] = {"n": n, "exact_match": pct(em, n), "edit_sim": pct(es / 100, n),
                              "healed_exact_match": pct(hem, n),
                              "healed_edit_sim": pct(hes / 100, n),
                              "baseline_exact_match": pct(bem, n),
                              "baseline_edit_sim": pct(bes / 100, n)}
        self.examples = pick_examples(candidates)
        return {"metric": "line", "context_tokens": self.args.context,
                "max_new_tokens": LINE_MAX_NEW, "per_lang": per_lang,
                **macro(per_lang, ("exact_match", "edit_sim", "healed_exact_match",
                                   "healed_edit_sim", "baseline_exact_match",
                                   "baseline_edit_sim"))}

    # -- fill in the middle -------------------------------------------------------------
    def fim_prompt(self, cp: CutPoint, make: Any) -> list[int]:
        pre_chars, suf_chars = self.args.fim_prefix_chars, self.args.fim_suffix_chars
        while True:
            prefix = cp.text[max(0, cp.cut - pre_chars):cp.cut]
            suffix = cp.text[cp.line_end:cp.line_end + suf_chars]
            ids = self.encode(make(cp.lang, prefix, suffix))
            if len(ids) + LINE_MAX_NEW <= self.max_positions or pre_chars + suf_chars == 0:
                return ids
            pre_chars, suf_chars = pre_chars // 2, suf_chars // 2

    def server_prompting(self) -> tuple[Any, int]:
        """The family and prompt budget the server uses for this model (or those asked
        for with --server-fim / --server-budget)."""
        from codevista.server.prompts import detect_family, model_prompt_tokens, prompt_budget
        from codevista.server.settings import Settings

        budget = prompt_budget(Settings().context_tokens, self.max_positions, LINE_MAX_NEW,
                               self.args.server_budget or model_prompt_tokens(self.loaded.path))
        family = detect_family(self.tok)
        if self.args.server_fim:  # the family's FIM prompt even at a line's end
            family = dataclasses.replace(family, prefix_only_at_line_end=False)
        return family, budget

    def fim(self, points: dict[str, list[CutPoint]]) -> dict[str, Any]:
        per_lang: dict[str, Any] = {}
        family, budget = self.server_prompting()
        progress = Progress("fim", 4 * sum(len(v) for v in points.values()))

        def at_end(lang: str, prefix: str, suffix: str) -> str:
            return formats.fim_spm(lang, prefix, "")  # nothing after the cursor

        for lang, cps in points.items():
            row: dict[str, Any] = {"n": len(cps)}
            for mode, make in (("psm", formats.fim_psm), ("spm", formats.fim_spm),
                               ("end", at_end), ("server", None)):
                em = es = 0.0
                for cp in cps:
                    if make is None:
                        pred = self.as_server(cp, family, budget)
                    else:
                        pred = self.generate(self.fim_prompt(cp, make), LINE_MAX_NEW, ("\n",))
                    em += exact_match(pred, cp.target)
                    es += edit_similarity(pred.strip(), cp.target.strip())
                    progress.tick()
                row[f"{mode}_exact_match"] = pct(em, len(cps))
                row[f"{mode}_edit_sim"] = pct(es / 100, len(cps))
            per_lang[lang] = row
        return {"metric": "fim", "prefix_chars": self.args.fim_prefix_chars,
                "suffix_chars": self.args.fim_suffix_chars, "per_lang": per_lang,
                **macro(per_lang, ("psm_exact_match", "psm_edit_sim", "spm_exact_match",
                                   "spm_edit_sim", "end_exact_match", "end_edit_sim",
                                   "server_exact_match", "server_edit_sim"))}

    def as_server(self, cp: CutPoint, family: Any, budget: int) -> str:
        """The rest of the cut line as the language server suggests it while the line is
        being typed: its prompt (`build_prompt` for `family` within `budget`, healing
        included; see `server_prompting`) for the document without the rest of that
        line, the first line after the healed text."""
        from codevista.server.documents import Snapshot
        from codevista.server.prompts import build_prompt

        text = cp.text[:cp.cut] + cp.text[cp.line_end:]
        uri = f"file:///held-out/{Path(cp.path).name}"
        snap = Snapshot(uri, 1, text, cp.lang, cp.cut)
        prompt = build_prompt(family, self.tok, snap, budget, path=uri)
        out = self.generate(prompt.ids, LINE_MAX_NEW, (), required_prefix=prompt.heal)
        raw = out[len(prompt.heal):] if out.startswith(prompt.heal) else ""
        return raw.split("\n", 1)[0]

    # -- translation ------------------------------------------------------------------------
    def translate(self, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": "translate", "split": "valid", "n": len(pairs)}
        directions = (("java", "csharp", 0, 1), ("csharp", "java", 1, 0))
        progress = Progress("translate", 2 * len(pairs))
        for src_lang, tgt_lang, si, ti in directions:
            sources = [p[si] for p in pairs]
            refs = [p[ti] for p in pairs]
            preds: list[str] = []
            raw_preds: list[str] = []
            first_def: list[str] = []
            reasons: Counter[str] = Counter()
            for src in sources:
                ids = self.encode(formats.translation(src_lang, src, tgt_lang))
                room = self.max_positions - len(ids)
                if room < 1:
                    preds.append("")
                    raw_preds.append("")
                    first_def.append("")
                    reasons["prompt_too_long"] += 1
                else:
                    max_new = min(2 * len(self.encode(src)) + 16, room)
                    result = self.generate_ids(ids, max_new, ())
                    raw = result.text.strip()
                    raw_preds.append(raw)
                    first_def.append(end_of_definition(raw).strip())
                    # What the server would show: it stops where the function ends
                    # (or the output starts looping), not where the model stops.
                    preds.append(self.served_translation(result.token_ids, src, src_lang,
                                                         tgt_lang))
                progress.tick()
            n = len(refs)
            em = sum(exact_match(p, r) for p, r in zip(preds, refs, strict=True))
            copy_em = sum(exact_match(s, r) for s, r in zip(sources, refs, strict=True))
            out[f"{src_lang}->{tgt_lang}"] = {
                "bleu": round(bleu_strings(refs, preds), 2), "exact_match": pct(em, n),
                "bleu_without_cut": round(bleu_strings(refs, raw_preds), 2),
                "bleu_first_definition": round(bleu_strings(refs, first_def), 2),
                "exact_match_first_definition": pct(
                    sum(exact_match(p, r) for p, r in zip(first_def, refs, strict=True)), n),
                "predictions": preds, "raw_predictions": raw_preds,
                "naive_copy_bleu": round(bleu_strings(refs, sources), 2),
                "naive_copy_exact_match": pct(copy_em, n),
                "skipped": dict(reasons),
                "published_test": [{"system": s, "bleu": b, "exact_match": a}
                                   for s, b, a in PUBLISHED[f"{src_lang}->{tgt_lang}"]]}
        return out


def macro(per_lang: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    rows = [v for v in per_lang.values() if v.get("n")]
    return {f"macro_{k}": round(sum(v[k] for v in rows) / len(rows), 2) if rows else None
            for k in keys}


def pick_examples(candidates: dict[str, list[dict[str, Any]]], limit: int = 6
                  ) -> list[dict[str, Any]]:
    """Up to `limit` completions: the first right and first wrong one of each language,
    alternating right and wrong, spread over languages."""
    right = [next(c for c in cs if c["exact_match"]) for cs in candidates.values()
             if any(c["exact_match"] for c in cs)]
    wrong = [next(c for c in cs if not c["exact_match"]) for cs in candidates.values()
             if any(not c["exact_match"] for c in cs)]
    half = limit // 2
    take_right = min(len(right), max(half, limit - len(wrong)))
    take_wrong = min(len(wrong), limit - take_right)
    out = []
    for i in range(max(take_right, take_wrong)):
        if i < take_right:
            out.append(right[i])
        if i < take_wrong:
            out.append(wrong[i])
    return out


# -- reporting ------------------------------------------------------------------------------

def markdown(results: dict[str, Any]) -> str:
    md = [f"# Quality of `{results['model']}`", "",
          f"Held-out data, greedy decoding, seed {results['settings']['seed']}. "
          "See benchmarks/quality.py for the exact definitions.", ""]
    if "bpb" in results:
        r = results["bpb"]
        md += ["## Bits per byte (held-out test files)", "",
               f"Windows of {r['window']} tokens scored independently; macro "
               f"{r['macro_bpb']}, micro {r['micro_bpb']}. With the language tag at the "
               f"start of every window (as every prompt of the server has it): macro "
               f"{r.get('macro_bpb_tagged')}.", "",
               "| lang | files | bytes scored | tokens | bits/byte | bits/token | "
               "bits/byte, tagged windows |",
               "|---|---|---|---|---|---|---|"]
        for lang, v in r["per_lang"].items():
            if v.get("files"):
                md.append(f"| {lang} | {v['files']} | {v['scored_bytes']} | "
                          f"{v['scored_tokens']} | {v['bpb']} | {v['bits_per_token']} | "
                          f"{v.get('bpb_tagged')} |")
            else:
                md.append(f"| {lang} | 0 | - | - | - | - | - |")
        md.append("")
    if "line" in results:
        r = results["line"]
        md += ["## Single-line completion (rest of the line, greedy)", "",
               "| lang | n | exact match % | edit sim % | healed EM % | healed ES % | "
               "baseline EM % | baseline ES % |",
               "|---|---|---|---|---|---|---|---|"]
        for lang, v in r["per_lang"].items():
            md.append(f"| {lang} | {v['n']} | {v['exact_match']} | {v['edit_sim']} | "
                      f"{v['healed_exact_match']} | {v['healed_edit_sim']} | "
                      f"{v['baseline_exact_match']} | {v['baseline_edit_sim']} |")
        md += [f"| **macro** | | {r['macro_exact_match']} | {r['macro_edit_sim']} | "
               f"{r['macro_healed_exact_match']} | {r['macro_healed_edit_sim']} | "
               f"{r['macro_baseline_exact_match']} | {r['macro_baseline_edit_sim']} |", "",
               "Healed: as the server asks, the last token of the text before the cut is "
               "removed from the prompt and regenerated under the constraint that it "
               "reproduces that text (token healing). Baseline: the previous non-blank line "
               "from the same column.", ""]
    if "fim" in results:
        r = results["fim"]
        md += ["## Single-line fill-in-the-middle (same cut points)", "",
               "| lang | n | PSM EM % | PSM ES % | SPM EM % | SPM ES % | end EM % | end ES % "
               "| server EM % | server ES % |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        for lang, v in r["per_lang"].items():
            md.append(f"| {lang} | {v['n']} | {v['psm_exact_match']} | {v['psm_edit_sim']} | "
                      f"{v['spm_exact_match']} | {v['spm_edit_sim']} | "
                      f"{v['end_exact_match']} | {v['end_edit_sim']} | "
                      f"{v['server_exact_match']} | {v['server_edit_sim']} |")
        md += [f"| **macro** | | {r['macro_psm_exact_match']} | {r['macro_psm_edit_sim']} | "
               f"{r['macro_spm_exact_match']} | {r['macro_spm_edit_sim']} | "
               f"{r['macro_end_exact_match']} | {r['macro_end_edit_sim']} | "
               f"{r['macro_server_exact_match']} | {r['macro_server_edit_sim']} |", "",
               "End: suffix-first with an empty suffix, as the server asks when nothing "
               "follows the cursor (writing at the end of a file). Server: the cut asked "
               "exactly as the language server asks while the line is typed (its prompt, "
               "budget and token healing; the rest of the line removed).", ""]
    if "translate" in results:
        r = results["translate"]
        a, b = r["java->csharp"], r["csharp->java"]
        md += ["## Java <-> C# translation (CodeXGLUE)", "",
               f"codevista and the computed naive copy: valid split, {r['n']} pairs. "
               "Published rows: CodeXGLUE test split (not comparable one to one).", "",
               "| system | Java -> C# BLEU | Acc % | C# -> Java BLEU | Acc % |",
               "|---|---|---|---|---|",
               f"| **codevista** (valid) | {a['bleu']} | {a['exact_match']} | "
               f"{b['bleu']} | {b['exact_match']} |",
               f"| naive copy (valid, computed) | {a['naive_copy_bleu']} | "
               f"{a['naive_copy_exact_match']} | {b['naive_copy_bleu']} | "
               f"{b['naive_copy_exact_match']} |"]
        for pa, pb in zip(a["published_test"], b["published_test"], strict=True):
            md.append(f"| {pa['system']} (test, published) | {pa['bleu']} | "
                      f"{pa['exact_match']} | {pb['bleu']} | {pb['exact_match']} |")
        md.append("")
    return "\n".join(md)


def model_info(loaded: LoadedModel) -> dict[str, Any]:
    cfg = loaded.config
    return {"path": str(loaded.path), "family": cfg.family,
            "parameters": sum(p.numel() for p in loaded.model.parameters()),
            "layers": cfg.num_layers, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "dtype": str(loaded.dtype).removeprefix("torch.")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="checkpoint directory (HF layout)")
    p.add_argument("--corpus", type=Path, default=Path("/work/corpus"),
                   help="folder with test.jsonl (held-out files)")
    p.add_argument("--pairs", type=Path, default=DEFAULT_PAIRS,
                   help="CodeXGLUE Java-C# folder (valid.java / valid.cs)")
    p.add_argument("--langs", default=",".join(DEFAULT_LANGS))
    p.add_argument("--skip", default="", help=f"comma list of {','.join(GROUPS)}")
    p.add_argument("--samples", type=int, default=100, help="cut points per language")
    p.add_argument("--context", type=int, default=None,
                   help="prompt tokens, line completion (default: the model's "
                        "codevista_prompt_tokens, else 768)")
    p.add_argument("--server-budget", type=int, default=None,
                   help="fim group, server mode: this prompt budget instead of the model's")
    p.add_argument("--server-fim", action="store_true",
                   help="fim group, server mode: the FIM prompt even at the end of a line")
    p.add_argument("--fim-prefix-chars", type=int, default=2048)
    p.add_argument("--fim-suffix-chars", type=int, default=1024)
    p.add_argument("--bpb-bytes", type=int, default=150_000, help="bytes per language")
    p.add_argument("--translation-limit", type=int, default=None, help="first N valid pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write a Markdown table")
    args = p.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(GROUPS):
        p.error(f"unknown group(s) in --skip: {', '.join(sorted(skip - set(GROUPS)))}")
    args.groups = [g for g in GROUPS if g not in skip]
    args.lang_list = [x for x in args.langs.split(",") if x]
    for lang in args.lang_list:
        if lang not in formats.LANGUAGES:
            p.error(f"unknown language {lang!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    if args.context is None:  # the context the model was trained to use, where it says
        from codevista.server.prompts import model_prompt_tokens

        args.context = model_prompt_tokens(args.model) or 768
    harness = Harness(loaded, args)
    results: dict[str, Any] = {
        "model": loaded.name, "model_info": model_info(loaded),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("lang_list",)}}

    def emit(group: str, r: dict[str, Any], started: float) -> None:
        r["elapsed_s"] = round(time.monotonic() - started, 1)
        results[group] = r
        # Per-pair translations go only to --out; stdout keeps one readable line a group.
        print(json.dumps({k: ({kk: vv for kk, vv in v.items() if "predictions" not in kk}
                              if isinstance(v, dict) else v) for k, v in r.items()}),
              flush=True)

    by_lang = read_test(args.corpus) if {"bpb", "line", "fim"} & set(args.groups) else {}
    if "bpb" in args.groups:
        log("bits per byte ...")
        started = time.monotonic()
        emit("bpb", harness.bpb(by_lang, args.lang_list), started)

    gen_groups = {"line", "fim", "translate"} & set(args.groups)
    if gen_groups:
        points: dict[str, list[CutPoint]] = {}
        for lang in args.lang_list:
            rows = by_lang.get(lang, [])
            if rows:
                rng = random.Random(f"{args.seed}:line:{lang}")
                points[lang] = cut_points(lang, rows, args.samples, rng)
            elif {"line", "fim"} & gen_groups:
                log(f"  {lang}: no held-out files, skipped")
        with Engine(loaded, num_threads=args.threads) as engine:
            harness.engine = engine
            if "line" in gen_groups:
                log("single-line completion ...")
                started = time.monotonic()
                emit("line", harness.line(points), started)
            if "fim" in gen_groups:
                log("fill in the middle ...")
                started = time.monotonic()
                emit("fim", harness.fim(points), started)
            if "translate" in gen_groups:
                log("translation ...")
                started = time.monotonic()
                pairs = read_pairs(args.pairs, "valid")[:args.translation_limit]
                emit("translate", harness.translate(pairs), started)
    results["examples"] = harness.examples
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table + "\n", encoding="utf-8")
    else:
        print(table, flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
