"""Text read from an image by a pretrained OCR model, and code re-assembled from it.

The OCR is PP-OCR (text detection + recognition, ONNX) as the `rapidocr` package ships it,
run by onnxruntime: the optional extra `codevista[ocr]`. Its models are inside the wheel,
so nothing is downloaded at run time. The vision model is small and trained on generated
pictures; this reads real screenshots. It serves two ways:

- `transcribe`: the text lines, in reading order, re-assembled into code. Indentation and
  runs of spaces come back from the boxes' x positions: code is set in a monospace font,
  so a character's column is its distance from the leftmost line start divided by the
  character width, which is estimated from the recognised words' widths and refined by a
  least-squares fit of the line starts to whole columns. Vertical gaps of more than one
  line pitch become blank lines.
- `explain` / `describe-diagram` / `locate`: the lines with their boxes (0-1000, like the
  vision tasks' boxes) go into the prompt beside the image (`formats.ocr_context`).

Reading runs in a worker thread (`OcrEngine.aread`); a cancelled request stops at the next
stage boundary (after detection, between recognition batches).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from statistics import median
from typing import Any

from .errors import NotReadyError

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'codevista[ocr]'"
REC_BATCH = 8  # recognition crops per batch: the cancellation granularity after detection


class OcrMissingError(NotReadyError):
    """The OCR extra (rapidocr + onnxruntime) is not installed."""


class OcrCancelled(Exception):
    """A read stopped between stages because its request was cancelled."""


def available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("rapidocr", "onnxruntime"))


def require(task: str) -> None:
    if not available():
        raise OcrMissingError(
            f"the {task} task reads text with OCR, which is not installed: {INSTALL_HINT} "
            "(rapidocr and onnxruntime; the models are inside the wheel, no download)")


@dataclass(frozen=True)
class OcrLine:
    """One detected text box: its text, its pixel box and its characters' pixel spans."""

    text: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float
    chars: tuple[tuple[str, float, float], ...] = ()  # (char, x1, x2) of non-space chars

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def yc(self) -> float:
        return (self.box[1] + self.box[3]) / 2


def text_shaped(line: OcrLine, image_height: int) -> bool:
    """False for a "line" that is a picture, not text: less than 1.5 times as wide as tall
    and at least 60 % of the image's height (50 % when it holds no letter or digit). The
    detector sometimes takes a picture of shapes for one text region, and the recogniser
    reads a "." or an "A" in it (28 % of generated shape scenes did); such a line in a
    prompt misleads the vision model. A real line of text, even a tight crop of one line,
    is much wider than tall; a crop of only one or two big characters is dropped too."""
    w, h = line.box[2] - line.box[0], line.height
    tall = 0.6 if any(c.isalnum() for c in line.text) else 0.5
    return not (w < 1.5 * h and h >= tall * image_height)


@dataclass
class OcrResult:
    width: int
    height: int
    lines: list[OcrLine]  # in reading order
    seconds: float = 0.0

    def boxes_1000(self) -> list[tuple[str, list[int]]]:
        """(text, [x1, y1, x2, y2]) per line, in 0-1000 coordinates of the image."""
        sx, sy = 1000 / max(1, self.width), 1000 / max(1, self.height)
        return [(ln.text, [min(1000, max(0, round(v * s))) for v, s in
                           zip(ln.box, (sx, sy, sx, sy), strict=True)]) for ln in self.lines]


@dataclass
class Transcription:
    text: str
    language: str | None
    lines: list[OcrLine] = field(default_factory=list)
    char_width: float = 0.0


# -- the OCR model ---------------------------------------------------------------------------

class OcrEngine:
    """rapidocr's PP-OCR, built on first use; one read at a time.

    Screenshot-specific choices: no orientation classifier (screens are upright), a dark
    image is inverted before reading (the models saw mostly dark text on light paper), and
    each text box can be widened by `pad` of its height before recognition (0 reads the
    held-out validation code best)."""

    def __init__(self, threads: int = 0, min_score: float = 0.5, pad: float = 0.0,
                 invert_dark: bool = True) -> None:
        self.threads = threads  # onnxruntime intra-op threads; 0: onnxruntime's default
        self.min_score = min_score
        self.pad = pad
        self.invert_dark = invert_dark
        self._ocr: Any = None
        self._lock = threading.Lock()

    def _engine(self) -> Any:
        if self._ocr is None:
            require("transcribe")
            from rapidocr import RapidOCR

            params: dict[str, Any] = {"Global.log_level": "error", "Global.use_cls": False,
                                      "Global.text_score": self.min_score}
            if self.threads > 0:
                params["EngineConfig.onnxruntime.intra_op_num_threads"] = self.threads
                params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
            t0 = time.perf_counter()
            self._ocr = RapidOCR(params=params)
            log.info("OCR engine ready in %.2f s", time.perf_counter() - t0)
        return self._ocr

    def read(self, img: Any, cancel: threading.Event | None = None) -> OcrResult:
        """Lines of a PIL image (or an RGB array), in reading order. Blocking."""
        import numpy as np

        def check() -> None:
            if cancel is not None and cancel.is_set():
                raise OcrCancelled()

        rgb = np.asarray(img.convert("RGB") if hasattr(img, "convert") else img)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 4:
            return OcrResult(int(rgb.shape[1]) if rgb.ndim > 1 else 0, int(rgb.shape[0]), [])
        h, w = rgb.shape[:2]
        if self.invert_dark and float(rgb.mean()) < 100:
            rgb = 255 - rgb
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        t0 = time.perf_counter()
        with self._lock:
            check()
            ocr = self._engine()
            det = ocr(bgr, use_det=True, use_cls=False, use_rec=False)
            quads = getattr(det, "boxes", None)
            if quads is None or len(quads) == 0:
                return OcrResult(w, h, [], time.perf_counter() - t0)
            check()
            quads = np.array(quads, dtype=np.float32)
            heights = quads[:, :, 1].max(1) - quads[:, :, 1].min(1)
            quads[:, [0, 3], 0] -= self.pad * heights[:, None]
            quads[:, [1, 2], 0] += self.pad * heights[:, None]
            quads[:, :, 0] = quads[:, :, 0].clip(0, w - 1)
            lines: list[OcrLine] = []
            for i in range(0, len(quads), REC_BATCH):
                lines += self._recognise(ocr, bgr, quads[i:i + REC_BATCH])
                check()
        lines = [ln for ln in lines if ln.text.strip() and ln.score >= self.min_score
                 and text_shaped(ln, h)]
        ordered = [ln for row in rows(lines) for ln in row]
        return OcrResult(w, h, ordered, time.perf_counter() - t0)

    @staticmethod
    def _recognise(ocr: Any, bgr: Any, quads: Any) -> list[OcrLine]:
        crops = ocr.crop_text_regions(bgr, quads)
        ocr.return_word_box = True
        rec = ocr.recognize_txt(crops)
        texts = [fix_confusions(normalise(str(t))) for t in rec.txts or ()]
        scores = list(rec.scores or ())
        chars: list[tuple[tuple[str, float, float], ...]] = [()] * len(texts)
        try:  # character spans: what recovers spaces inside a line
            rec = ocr.cal_rec_boxes(crops, quads, rec, True)
            if rec.word_results is not None and len(rec.word_results) == len(texts):
                chars = [tuple((normalise(str(t)), float(min(p[0] for p in b)),
                                float(max(p[0] for p in b)))
                               for t, _, b in item if b is not None and str(t).strip())
                         for item in rec.word_results]
        except Exception as e:  # an older or newer rapidocr: lines still come back
            log.debug("character boxes unavailable: %s", e)
        out = []
        for q, text, score, cs in zip(quads, texts, scores, chars, strict=True):
            flat = text.replace(" ", "")
            if len(cs) == len(flat):  # the corrected letters (corrections are one for one)
                cs = tuple((ch, x1, x2) for ch, (_, x1, x2) in zip(flat, cs, strict=True))
            else:
                cs = ()
            xs, ys = [float(p[0]) for p in q], [float(p[1]) for p in q]
            out.append(OcrLine(text, (min(xs), min(ys), max(xs), max(ys)), float(score), cs))
        return out

    async def aread(self, img: Any) -> OcrResult:
        """`read` in a worker thread; cancelling the awaiting task stops it at the next
        stage boundary."""
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self.read, img, cancel)
        except asyncio.CancelledError:
            cancel.set()
            raise


# Look-alikes the (Chinese + Latin) recogniser writes for ASCII punctuation.
_LOOKALIKES = str.maketrans({"′": "'", "‘": "'", "’": "'", "´": "'", "“": '"', "”": '"',
                             "″": '"', "–": "-", "—": "-", "−": "-", "…": "...", "·": "."})


_STARS = str.maketrans({c: "*" for c in "米★☆×✱∗⁎"})


def normalise(text: str) -> str:
    """Full-width forms to ASCII (NFKC) and typographic look-alikes to code punctuation;
    米, ★ and × are how the recogniser reads an asterisk in otherwise ASCII text."""
    import unicodedata

    text = unicodedata.normalize("NFKC", text).translate(_LOOKALIKES)
    stars = text.translate(_STARS)
    return stars if stars.isascii() else text


# Lowercase letters that look like their capitals.
_CASE_ALIKE = set("cosvwxz")
_WORD = re.compile(r"[A-Za-z0-9_]+")


@lru_cache(maxsize=1)
def _code_tokenizer() -> Any:
    from codevista.models.loader import DEFAULT_MODEL_DIR
    from tokenizers import Tokenizer

    path = DEFAULT_MODEL_DIR / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def _fix_word(word: str) -> str:
    """The recogniser's case and look-alike confusions in one identifier, corrected where
    the code tells: an all-capitals word with a lowercase look-alike inside (JsoN, ENoENT)
    is all capitals; an `l` that starts a CamelCase part (ArraylndexOutOf, Stoplteration)
    or a `0` beside a lowercase letter (0ption) becomes I / O when the embedded code
    model's tokenizer, learned from code, splits the result into fewer pieces (a word it
    has seen often). On the validation split's own clean text it changes 5 of 417k words."""
    if sum(c.isalpha() for c in word) < 2:
        return word
    core = word[:-1] if word.endswith("s") else word  # a plural: IDs, URLs
    if (word.isalpha() and len(core) >= 3 and core[0].isupper() and core[-1].isupper()
            and all(c.isupper() or c in _CASE_ALIKE for c in core)):
        return core.upper() + word[len(core):]
    tok = _code_tokenizer()
    if tok is None:
        return word
    digits = sum(c.isdigit() for c in word)
    camel = any(c.isupper() for c in word)
    best, cost = word, -1
    for i, c in enumerate(word):
        alt = None
        if (c == "l" and camel and 0 < i and word[i - 1].islower()
                and len(word) > i + 2 and word[i + 1:i + 3].isalpha()
                and word[i + 1:i + 3].islower()):
            alt = "I"
        elif (c == "0" and digits == 1 and not re.match(r"0[xXbBoO]", word)
              and ((i and word[i - 1].islower())
                   or (i + 1 < len(word) and word[i + 1].islower()))):
            alt = "O"
        if alt is not None:
            if cost < 0:
                cost = len(tok.encode(best, add_special_tokens=False).ids)
            cand = best[:i] + alt + best[i + 1:]
            n = len(tok.encode(cand, add_special_tokens=False).ids)
            if n < cost:
                best, cost = cand, n
    return best


def fix_confusions(text: str) -> str:
    """`_fix_word` on every identifier of an OCR line (letters change one for one)."""
    return _WORD.sub(lambda m: _fix_word(m.group()), text)


# -- layout: rows, columns, blank lines -------------------------------------------------------

def rows(lines: list[OcrLine]) -> list[list[OcrLine]]:
    """Boxes grouped into text rows (top to bottom), each row left to right."""
    out: list[list[OcrLine]] = []
    for ln in sorted(lines, key=lambda b: (b.yc, b.box[0])):
        if out:
            row = out[-1]
            ref_h = median(b.height for b in row)
            ref_y = sum(b.yc for b in row) / len(row)
            if abs(ln.yc - ref_y) < 0.45 * max(ref_h, ln.height):
                row.append(ln)
                continue
        out.append([ln])
    for row in out:
        row.sort(key=lambda b: b.box[0])
    return out


def _centres(ln: OcrLine) -> list[float]:
    return [(x1 + x2) / 2 for _, x1, x2 in ln.chars]


MONO_RESIDUAL = 0.25  # in character widths; measured ~0.14 for monospace, >= 0.33 otherwise


def char_width(lines: list[OcrLine]) -> tuple[float, bool]:
    """The width of one character, and whether the font is monospace.

    Per box, the centres of each word's characters are fit by least squares to their
    positions in the word (centre = a_word + width * index, one width per box, so that the
    spaces between words, which the OCR may have read wrong, do not count): the width is the
    median over boxes. In a monospace font every character sits on its word's line, up to
    the recogniser's coarse horizontal steps; in a proportional one, narrow and wide glyphs
    pull centres off it. So the font is taken as monospace when the boxes' 90th-percentile
    distance from the line is under MONO_RESIDUAL widths (boxes with 8 such characters or
    more decide; none: not monospace), and a space the OCR read is as wide as a character
    (in a proportional font it is about half as wide)."""
    slopes, residuals, spaces = [], [], []
    for ln in lines:
        c = _centres(ln)
        words: list[list[tuple[int, float]]] = [[]]
        k = 0
        for i, ch in enumerate(ln.text):
            if ch == " ":
                words.append([])
            elif k < len(c):
                words[-1].append((i, c[k]))
                k += 1
        words = [w for w in words if len(w) >= 2]
        means = [(sum(i for i, _ in w) / len(w), sum(x for _, x in w) / len(w)) for w in words]
        var = sum((i - mi) ** 2 for w, (mi, _) in zip(words, means, strict=True) for i, _ in w)
        if var <= 0:
            continue
        slope = sum((i - mi) * (x - mx) for w, (mi, mx) in zip(words, means, strict=True)
                    for i, x in w) / var
        if slope <= 0:
            continue
        slopes.append(slope)
        if len(c) == len(ln.chars):
            k = 0
            for i, ch in enumerate(ln.text):
                if ch != " ":
                    k += 1
                elif 0 < k < len(c) and ln.text[i - 1] != " " and ln.text[i + 1] != " ":
                    spaces.append((c[k] - c[k - 1]) / slope - 1)
        r = sorted(abs(x - mx - slope * (i - mi)) / slope
                   for w, (mi, mx) in zip(words, means, strict=True) for i, x in w)
        if len(r) >= 8:
            residuals.append(r[int(0.9 * (len(r) - 1))])
    if not slopes:
        ws = [(ln.box[2] - ln.box[0]) / len(ln.text) for ln in lines if ln.text]
        return (median(ws) if ws else 8.0), False
    mono = bool(residuals) and median(residuals) < MONO_RESIDUAL
    if spaces:
        mono = mono and median(spaces) > 0.75
    return median(slopes), mono


def _columns(starts: list[float], cw: float) -> list[int]:
    """Whole columns for x positions: clusters of starts (within 0.4 of a column) are fit
    to x = x0 + cw * column by least squares, which refines cw on deep indentation."""
    x0 = min(starts)
    order = sorted(range(len(starts)), key=lambda i: starts[i])
    clusters: list[list[int]] = []
    for i in order:
        if clusters and starts[i] - starts[clusters[-1][-1]] < 0.4 * cw:
            clusters[-1].append(i)
        else:
            clusters.append([i])
    centres = [sum(starts[i] for i in c) / len(c) for c in clusters]
    weights = [len(c) for c in clusters]
    for _ in range(3):
        cols = [round((c - x0) / cw) for c in centres]
        if len(set(cols)) < 2:
            break
        sw = sum(weights)
        mc = sum(w * k for w, k in zip(weights, cols, strict=True)) / sw
        mx = sum(w * c for w, c in zip(weights, centres, strict=True)) / sw
        var = sum(w * (k - mc) ** 2 for w, k in zip(weights, cols, strict=True))
        cov = sum(w * (k - mc) * (c - mx) for w, k, c in
                  zip(weights, cols, centres, strict=True))
        new_cw = cov / var if var > 0 else cw
        if not 0.9 * cw <= new_cw <= 1.1 * cw:
            break
        cw, x0 = new_cw, mx - new_cw * mc
    col_of = {}
    for c, centre in zip(clusters, centres, strict=True):
        for i in c:
            col_of[i] = max(0, round((centre - x0) / cw))
    return [col_of[i] for i in range(len(starts))]


def _spaced(ln: OcrLine, cw: float) -> str:
    """A box's text with its spaces taken from its characters' positions: a gap of k
    character widths is k spaces (a space the OCR read where the characters touch is
    dropped, one it missed where they are two widths apart is put back)."""
    if not ln.chars:
        return ln.text
    spaced_before = []  # did the OCR text have a space before each non-space character?
    prev_space = False
    for ch in ln.text:
        if ch == " ":
            prev_space = True
        else:
            spaced_before.append(prev_space)
            prev_space = False
    c = _centres(ln)
    out = ln.chars[0][0]
    for k in range(1, len(ln.chars)):
        gap = (c[k] - c[k - 1]) / cw - 1  # whole characters between the two
        n = max(0, round(gap))
        if spaced_before[k] and n == 0 and gap > 0.35:
            n = 1
        out += " " * n + ln.chars[k][0]
    return out


def reassemble(lines: list[OcrLine], layout: bool = True) -> tuple[str, float]:
    """The text of OCR lines. With `layout`, indentation, inner spacing and blank lines are
    recovered; without, each row's boxes are joined by one space. Also the character
    width used (0.0 without layout)."""
    grid = rows(lines)
    if not grid:
        return "", 0.0
    if not layout:
        return "\n".join(" ".join(b.text.strip() for b in row) for row in grid), 0.0
    cw, mono = char_width(lines)
    boxes = [b for row in grid for b in row]
    cols = _columns([b.box[0] for b in boxes], cw)
    col_of = {id(b): c for b, c in zip(boxes, cols, strict=True)}
    ys = [sum(b.yc for b in row) / len(row) for row in grid]
    deltas = [b - a for a, b in zip(ys, ys[1:], strict=False)]
    pitch = 0.0
    if deltas:
        small = min(deltas)
        pitch = median([d for d in deltas if d < 1.4 * small])
    out: list[str] = []
    for r, row in enumerate(grid):
        if r and pitch > 0:
            out += [""] * max(0, round(deltas[r - 1] / pitch) - 1)
        text = ""
        for b in row:
            piece = (_spaced(b, cw) if mono else b.text).strip()
            start = col_of[id(b)]
            text += " " * (max(start - len(text), 1 if text else 0)) + piece
        out.append(_comment_star(text.rstrip(), out))
    return "\n".join(out), cw


def _comment_star(line: str, before: list[str]) -> str:
    """An X that opens a line inside a /* ... */ block is how some fonts' asterisk reads."""
    body = line.lstrip()
    prev = next((b.lstrip() for b in reversed(before) if b.strip()), "")
    if body[:2] in ("X ", "x ", "X", "x") and prev.startswith(("/*", "*")) \
            and not prev.endswith("*/"):
        return line[:len(line) - len(body)] + "*" + body[1:]
    return line


# -- which language ---------------------------------------------------------------------------

# (pattern, weight) per LSP language id; a pattern counts once per line it matches.
_SIGNS: dict[str, list[tuple[str, float]]] = {
    "python": [(r"^\s*def \w+\(.*\)\s*(->.*)?:\s*$", 3), (r"^\s*(el)?if .*:\s*$", 1.5),
               (r"^\s*(from \w[\w.]* )?import \w", 1), (r"\bself\.", 1.5),
               (r"\b(None|True|False|elif|lambda)\b", 1), (r"^\s*class \w+.*:\s*$", 2),
               (r"Traceback \(most recent call last\)", 8), (r'^\s*File ".*", line \d+', 6),
               (r"^\s*#", 0.3), (r"^\s*(for|while) .*:\s*$", 1.5), (r"\bprint\(", 0.5),
               (r"^\w*(Error|Exception): ", 1)],
    "java": [(r"\b(public|private|protected)\s+(static\s+)?(final\s+)?[\w<>\[\]]+\s+\w+\s*\(", 2),
             (r"\bSystem\.(out|err)\.print", 3), (r"^\s*import java\.", 4),
             (r"^\s*package [\w.]+;", 2), (r"@Override|@Test\b", 2), (r"\bString\[\]", 2),
             (r"\bnew \w+(<.*>)?\(", 0.7), (r"^\s*at [\w.$<>]+\(\w+\.java:\d+\)", 6),
             (r'Exception in thread "', 6), (r"\bjava\.(lang|util|io)\.", 3),
             (r"\b(final|extends|implements|throws)\b", 1),
             (r"\{@(code|link|inheritDoc|literal)\b", 3),
             (r"^\s*\*\s*@(param \w+ |throws|return )", 1.5),
             (r"\b(Override|Deprecated|SuppressWarnings)\b", 1)],
    "csharp": [(r"^\s*using System", 4), (r"\bConsole\.Write", 4), (r"^\s*namespace [\w.]+", 2),
               (r"\bpublic\s+(override\s+)?(async\s+)?\w+\s+[A-Z]\w*\s*\(", 1),
               (r"\{\s*get;\s*(set;)?\s*\}", 4), (r"\bvar \w+ = new\b", 1), (r"\bstring\b", 1)],
    "c": [(r"^\s*#include\s*<(stdio|stdlib|string|unistd)\.h>", 4), (r"\bprintf\s*\(", 1),
          (r"\b(malloc|free|sizeof)\s*\(", 1.5), (r"^\s*#(define|ifdef|ifndef|endif)\b", 1),
          (r"\bstruct \w+\s*[{*]", 1), (r"->\w", 0.7), (r"\bNULL\b", 1),
          (r"^\s*(static\s+)?(int|void|char|unsigned|long)\s+\**\w+\s*\(", 1.5),
          (r"Segmentation fault", 3), (r"\b(__u\d+|u?int\d+_t|size_t)\b", 1),
          (r"^\s*(typedef )?(enum|struct|union) \w+ \{", 1.5)],
    "cpp": [(r"\bstd::", 3), (r"^\s*#include\s*<\w+>\s*$", 1.5), (r"\btemplate\s*<", 3),
            (r"\b(cout|cerr|endl)\b", 3), (r"\bnamespace \w+\s*\{", 1),
            (r"\b(nullptr|constexpr|virtual|override|public:|private:)", 2),
            (r"^\s*#include", 0.5), (r"\w::\w", 0.5)],
    "javascript": [(r"\bfunction\s*\w*\s*\(", 1.5), (r"\bconst \w+ = require\(", 4),
                   (r"\bconsole\.(log|error)", 3), (r"=>", 0.7), (r"\b(let|var) \w+ =", 1),
                   (r"===|!==", 1.5), (r"\bmodule\.exports\b", 4), (r"\bundefined\b", 1),
                   (r"^\s*at .*\(.*\.m?js:\d+:\d+\)", 6), (r"\bnode:internal", 6),
                   (r"^\s*(export|import) .* from ['\"]", 1), (r"\bdocument\.|\bwindow\.", 2),
                   (r"^\s*[\"']use strict[\"'];?", 4),
                   (r"^\s*\*\s*@(param|returns?|type|typedef) \{", 2)],
    "typescript": [(r"^\s*(export )?interface \w+", 4), (r":\s*(string|number|boolean|void)\b", 2),
                   (r"^\s*(export )?type \w+ = ", 3), (r"\b(readonly|private|public) \w+\s*:", 2),
                   (r"\bimplements\b", 0.5), (r"<\w+>\(", 0.5), (r"\bas \w+", 0.5),
                   (r"^\s*import .* from ['\"]", 1), (r"=>", 0.3),
                   (r"\bdeclare (const|function|module|namespace|var)\b", 4)],
    "go": [(r"^\s*func (\(\w+ \*?\w+\) )?\w+\(", 4), (r"^\s*package \w+\s*$", 3), (r":=", 2),
           (r"\bfmt\.\w+", 3), (r"\bnil\b", 1), (r"\berr != nil\b", 3), (r"\bchan\b", 1),
           (r"^\s*import \($", 3), (r"\bgo func\b", 3), (r"\bgoroutine\b|panic: ", 2)],
    "rust": [(r"^\s*(pub(\(crate\))? )?fn \w+", 4), (r"\blet mut\b", 3), (r"\bimpl\b", 2),
             (r"&self\b|&mut self\b", 3), (r"\b(Some|None|Ok|Err)\(", 1),
             (r"\.unwrap\(\)", 2), (r"\w!\(", 1), (r"^\s*use \w+(::\w+)+", 2),
             (r"\bmatch \w", 1), (r"->\s*(Self|Result|Option|&)", 2), (r"^\s*#\[\w", 3),
             (r"\bpanicked at\b", 6), (r"^error\[E\d+\]", 6), (r"^\s*//[/!] ", 1.5)],
}
_COMPILED = {lang: [(re.compile(p, re.M), w) for p, w in signs] for lang, signs in _SIGNS.items()}


def guess_language(text: str) -> str | None:
    """The LSP language id that the text most looks like, or None when nothing points to
    one. Weighted signs per language, each counted once per line it appears on."""
    if not text.strip():
        return None
    scores = {lang: sum(w * len(p.findall(text)) for p, w in signs)
              for lang, signs in _COMPILED.items()}
    # a language's superset wins only on its own signs
    if scores["typescript"] > 0:
        scores["typescript"] += 0.5 * scores["javascript"]
    if scores["cpp"] > 0:
        scores["cpp"] += 0.3 * scores["c"]
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] >= 2 else None


# -- the transcribe task ----------------------------------------------------------------------

def transcribe(result: OcrResult, layout: bool = True) -> Transcription:
    text, cw = reassemble(result.lines, layout)
    return Transcription(text, guess_language(text), result.lines, cw)
