"""Images and questions the default vision model learns from, generated, never downloaded.

Five kinds of picture, each with answers for the editor's four tasks:
- scenes of 1-9 shapes (circle, square, triangle) in seven colours: counting, colour and
  shape questions, grounding (`locate` -> a box in 0-1000 coordinates), a description;
- flowcharts of 2-5 labelled boxes joined by arrows: `describe-diagram` -> nodes and edges;
- bar charts: which bar is highest, the value of a bar, a description;
- code in several fonts, sizes and light/dark themes: `transcribe` -> the exact text;
- error dialogs: `transcribe`, and `explain` -> what the message means.

Everything is drawn with Pillow from a seeded `random.Random`, so a sample is a pure
function of (split, seed). The held-out split uses other seeds and its own label words
(`HELDOUT_WORDS`, never drawn in training), so diagram and chart answers cannot be
memorised.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

IMAGE_SIZE = 160
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
          "yellow": (225, 195, 20), "orange": (240, 130, 20), "purple": (140, 60, 170),
          "black": (25, 25, 25)}
SHAPES = ("circle", "square", "triangle")
TRAIN_WORDS = (
    "parse check save load user cart login order pay ship auth token cache fetch store "
    "merge build test lint deploy start stop retry queue send read write open close sort "
    "scan lex emit init hash sign index query join split clean render draw route view "
    "model sync pull push tag plan list item node edge path root leaf tree heap").split()
HELDOUT_WORDS = (
    "audit bill crop dump evict fold grant hook ingest jump kick label mount nudge "
    "patch quota rank seed trim vote").split()
ERRORS = [
    ("NameError: name '{w}' is not defined",
     "Python cannot find a variable called {w}: define {w} before you use it, or fix the "
     "spelling."),
    ("TypeError: {w}() missing 1 argument",
     "The function {w} was called with too few arguments: pass the missing argument."),
    ("KeyError: '{w}'",
     "The dictionary has no key {w}: check the key, or use .get('{w}') with a default."),
    ("ZeroDivisionError: division by zero",
     "A number was divided by zero: check that the divisor is not zero first."),
    ("IndexError: list index out of range",
     "The code read past the end of a list: check the index against len() first."),
    ("NullPointerException at {w}",
     "Java used a null reference in {w}: make sure the object is created before use."),
    ("error: expected ';' after {w}",
     "The compiler wants a semicolon after {w}: add the missing ';'."),
]
FONTS = ("DejaVuSansMono.ttf", "DejaVuSans.ttf", "DejaVuSerif.ttf")
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu"),
             Path("/usr/share/fonts/truetype/liberation"))
# Monospace fonts of different designs, for screenshot-size code (OCR evaluation).
MONO_FONTS = ("DejaVuSansMono.ttf", "LiberationMono-Regular.ttf", "DejaVuSansMono-Bold.ttf")


@dataclass
class Sample:
    image: Any  # PIL.Image.Image, RGB, IMAGE_SIZE square
    task: str  # explain | describe-diagram | transcribe | locate
    question: str | None  # the user's words (explain with a question, locate's target)
    answer: str
    kind: str  # what the metrics group it by: count, color, shape, locate, diagram, ...
    meta: dict[str, Any] = field(default_factory=dict)


@lru_cache(maxsize=64)
def font(name: str, size: int):
    from PIL import ImageFont

    for d in FONT_DIRS:
        if (d / name).is_file():
            return ImageFont.truetype(str(d / name), size)
    return ImageFont.load_default(size=size)


def words(split: str) -> list[str]:
    return HELDOUT_WORDS if split == "test" else TRAIN_WORDS


_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "cl", "dr", "fl", "gr", "pl", "st", "tr", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ee")
_CODAS = ("", "", "", "n", "r", "s", "t", "k", "m", "x", "ld", "nd", "st")


@lru_cache(maxsize=1)
def _code_vocabulary() -> tuple[str, ...]:
    """The code tokenizer's tokens as stored (a leading space is written \u0120)."""
    import json

    path = Path(__file__).resolve().parents[1] / "default" / "code" / "tokenizer.json"
    return tuple(json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"])


@lru_cache(maxsize=1)
def vocabulary_words() -> tuple[str, ...]:
    """Lower-case words of 3-7 letters that the code tokenizer holds as one token (about
    1 200: "access", "merge", "yield", ...), without the held-out words."""
    import re

    found = {t[1:] for t in _code_vocabulary() if re.fullmatch(r"\u0120[a-z]{3,7}", t)}
    return tuple(sorted(found - set(HELDOUT_WORDS)))


@lru_cache(maxsize=1)
def vocabulary_pieces() -> tuple[str, ...]:
    """Every alphabetic token of the code tokenizer of 2-8 letters, as written without its
    leading space, in any case ("atch", "ict", "Value", "um": about 4 000), without the
    held-out words in any case. Labels made of them make every such token an answer the
    model copies, not only the ~1 200 words of `vocabulary_words` (a token never an
    answer in training is one a long run learns never to write, however clearly the OCR
    lines show it)."""
    import re

    held = {w.lower() for w in HELDOUT_WORDS}
    found = {m.group(1) for t in _code_vocabulary()
             if (m := re.fullmatch(r"\u0120?([A-Za-z]{2,8})", t))}
    return tuple(sorted(w for w in found if w.lower() not in held))


def piece_word(rng: random.Random) -> str:
    """A label of one or two `vocabulary_pieces` (3-8 letters), never a held-out word."""
    while True:
        w = "".join(rng.choice(vocabulary_pieces()) for _ in range(rng.choice((1, 2))))
        if 3 <= len(w) <= 8 and w.lower() not in HELDOUT_WORDS:
            return w


def novel_word(rng: random.Random, vocab: float = 0.4, pieces: float = 0.0) -> str:
    """A label outside the 55 training words, never one of the held-out words: 40 % a
    word of the code vocabulary (`vocabulary_words`), 30 % a pronounceable made-up one
    ("brelk", "tousim"), 30 % 3-7 random letters ("qjxwe": every letter pair, so copying
    is learned for any token, not only for syllables seen in labels). A model trained on
    such labels cannot memorise them: it must copy them from what it reads. `vocab`: the
    share of vocabulary words (the rest half random letters, half made-up); a long run
    can learn the ~1 200 vocabulary words' pictures by heart, the others not. `pieces`:
    the share drawn by `piece_word` first (0 draws exactly as before)."""
    if pieces > 0 and rng.random() < pieces:
        return piece_word(rng)
    r = rng.random()
    if r < vocab:
        return rng.choice(vocabulary_words())
    if r < vocab + (1 - vocab) / 2:
        while True:
            w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                        for _ in range(rng.randint(3, 7)))
            if w not in HELDOUT_WORDS:
                return w
    while True:
        w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS)
                    for _ in range(rng.randint(1, 2))) + rng.choice(_CODAS)
        if 3 <= len(w) <= 8 and w not in HELDOUT_WORDS:
            return w


def box_1000(x1: float, y1: float, x2: float, y2: float) -> list[int]:
    s = 1000 / IMAGE_SIZE
    return [round(x1 * s), round(y1 * s), round(x2 * s), round(y2 * s)]


def _canvas(rng: random.Random, dark: bool = False):
    from PIL import Image

    g = rng.randint(20, 45) if dark else rng.randint(235, 255)
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (g, g, g))


def _text_box(d, xy: tuple[float, float], text: str, f) -> list[int]:
    """The 0-1000 box of text drawn at xy (for the simulated OCR input)."""
    return box_1000(*d.textbbox(xy, text, font=f))


# -- shapes -------------------------------------------------------------------------------

def _place(rng: random.Random, n: int) -> list[tuple[int, int, int]]:
    """n non-overlapping (x, y, size) squares inside the canvas."""
    out: list[tuple[int, int, int]] = []
    tries = 0
    while len(out) < n and tries < 2000:
        tries += 1
        s = rng.randint(16, 30)
        x, y = rng.randint(4, IMAGE_SIZE - s - 4), rng.randint(4, IMAGE_SIZE - s - 4)
        if all(x + s + 4 <= a or a + b + 4 <= x or y + s + 4 <= c or c + b + 4 <= y
               for a, c, b in out):
            out.append((x, y, s))
    return out


SCENE_QUESTIONS = ("count", "count", "count_shape", "color", "shape", "locate", "locate",
                   "describe")
# drawn only by a training continuation's weights, never held out: locate by one attribute
# ("the triangle", "the red shape") where it alone picks the object out, an easier lookup
# than the held-out colour-and-shape one
TRAIN_SCENE_QUESTIONS = ("locate_one",)


def _locate(img, obj: dict, target: str) -> Sample:
    b = box_1000(*obj["box"])
    return Sample(img, "locate", target, f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]", "locate",
                  {"box": b})


def shapes(rng: random.Random, split: str, weights: dict[str, float] | None = None
           ) -> Sample:
    """A scene of 1-9 shapes and one question about it, drawn from SCENE_QUESTIONS
    uniformly or, given `weights` (question kind -> weight; a training continuation that
    stresses some of them), by those weights. The held-out split always draws uniformly."""
    from PIL import ImageDraw

    img = _canvas(rng)
    d = ImageDraw.Draw(img)
    n = rng.randint(1, 9)
    objs = []
    for x, y, s in _place(rng, n):
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        fill = COLORS[color]
        if shape == "circle":
            d.ellipse((x, y, x + s, y + s), fill=fill)
        elif shape == "square":
            d.rectangle((x, y, x + s, y + s), fill=fill)
        else:
            d.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=fill)
        objs.append({"color": color, "shape": shape, "box": (x, y, x + s, y + s)})
    n = len(objs)
    objs.sort(key=lambda o: (o["box"][1] // 20, o["box"][0]))
    if weights is None:
        kind = rng.choice(SCENE_QUESTIONS)
    else:
        kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    by_shape = {s: [o for o in objs if o["shape"] == s] for s in SHAPES}
    by_color = {c: [o for o in objs if o["color"] == c] for c in COLORS}
    unique = [o for o in objs if sum(p["color"] == o["color"] and p["shape"] == o["shape"]
                                     for p in objs) == 1]
    if kind == "count_shape":
        s = rng.choice(SHAPES)
        return Sample(img, "explain", f"How many {s}s are there?", str(len(by_shape[s])),
                      "count", {"n": len(by_shape[s])})
    if kind == "color":
        cands = [o for o in objs if len(by_shape[o["shape"]]) == 1]
        if cands:
            o = rng.choice(cands)
            return Sample(img, "explain", f"What colour is the {o['shape']}?", o["color"],
                          "color", {"box": box_1000(*o["box"])})
    if kind == "shape":
        cands = [o for o in objs if len(by_color[o["color"]]) == 1]
        if cands:
            o = rng.choice(cands)
            return Sample(img, "explain", f"What shape is the {o['color']} object?",
                          o["shape"], "shape", {"box": box_1000(*o["box"])})
    if kind == "locate_one":
        cands = [(o, f"the {o['shape']}") for o in objs if len(by_shape[o["shape"]]) == 1]
        cands += [(o, f"the {o['color']} shape") for o in objs
                  if len(by_color[o["color"]]) == 1]
        if cands:
            o, target = rng.choice(cands)
            return _locate(img, o, target)
    if kind == "locate" and unique:
        o = rng.choice(unique)
        return _locate(img, o, f"the {o['color']} {o['shape']}")
    if kind == "describe":
        parts = ", ".join(f"a {o['color']} {o['shape']}" for o in objs)
        return Sample(img, "explain", None, f"{n} shape{'s' * (n != 1)}: {parts}.", "describe")
    return Sample(img, "explain", "How many shapes are there?", str(n), "count", {"n": n})


# -- flowcharts ----------------------------------------------------------------------------

def _arrow(d, a: tuple[float, float], b: tuple[float, float], color) -> None:
    import math

    d.line([a, b], fill=color, width=1)
    ang = math.atan2(b[1] - a[1], b[0] - a[0])
    for da in (2.6, -2.6):
        d.line([b, (b[0] + 6 * math.cos(ang + da), b[1] + 6 * math.sin(ang + da))],
               fill=color, width=1)


def _border_point(box, toward):
    """Where the segment from box's centre to `toward` leaves the box."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    dx, dy = toward[0] - cx, toward[1] - cy
    if dx == 0 and dy == 0:
        return cx, cy
    tx = (x2 - cx) / abs(dx) if dx else float("inf")
    ty = (y2 - cy) / abs(dy) if dy else float("inf")
    t = min(tx, ty)
    return cx + dx * t, cy + dy * t


def flowchart(rng: random.Random, split: str, novel: float = 0.0, vocab: float = 0.4,
              pieces: float = 0.0) -> Sample:
    """`novel`: in the train split, the share of diagrams labelled with made-up words
    (`novel_word`, with `vocab` and `pieces`) instead of the 55 training words (0 draws
    exactly as before)."""
    from PIL import ImageDraw

    dark = rng.random() < 0.25
    img = _canvas(rng, dark)
    d = ImageDraw.Draw(img)
    fg = (230, 230, 230) if dark else (20, 20, 20)
    k = rng.randint(2, 5)
    if novel > 0 and split != "test" and rng.random() < novel:
        labels: list[str] = []
        while len(labels) < k:
            w = novel_word(rng, vocab, pieces)
            labels += [w] if w not in labels else []
    else:
        labels = rng.sample(words(split), k)
    cells = rng.sample([(c, r) for c in range(3) for r in range(3)], k)
    cells.sort(key=lambda cr: (cr[1], cr[0]))  # reading order
    boxes = []
    texts = []
    f = font("DejaVuSans.ttf", 10)
    for (c, r), label in zip(cells, labels, strict=True):
        cx, cy = 27 + c * 53, 27 + r * 53
        box = (cx - 24, cy - 10, cx + 24, cy + 10)
        d.rectangle(box, outline=fg, width=1)
        w = d.textlength(label, font=f)
        d.text((cx - w / 2, cy - 6), label, fill=fg, font=f)
        texts.append((label, _text_box(d, (cx - w / 2, cy - 6), label, f)))
        boxes.append(box)
    edges = [(i, i + 1) for i in range(k - 1)]
    if k >= 3 and rng.random() < 0.4:
        a = rng.randrange(k - 2)
        edges.append((a, rng.randrange(a + 2, k)))
    for a, b in edges:
        ca = ((boxes[a][0] + boxes[a][2]) / 2, (boxes[a][1] + boxes[a][3]) / 2)
        cb = ((boxes[b][0] + boxes[b][2]) / 2, (boxes[b][1] + boxes[b][3]) / 2)
        _arrow(d, _border_point(boxes[a], cb), _border_point(boxes[b], ca), fg)
    edge_text = ", ".join(f"{labels[a]} -> {labels[b]}" for a, b in edges)
    answer = f"Nodes: {', '.join(labels)}. Edges: {edge_text}."
    return Sample(img, "describe-diagram", None, answer, "diagram",
                  {"nodes": labels, "edges": [(labels[a], labels[b]) for a, b in edges],
                   "text_boxes": texts})


# -- bar charts ----------------------------------------------------------------------------

def reading_order(texts: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    """Text boxes (text, [x1, y1, x2, y2]) in the order the server's OCR gives its lines:
    rows top to bottom, each left to right (`ocr.rows`)."""
    from codevista.server.ocr import OcrLine, rows

    lines = [OcrLine(t, tuple(float(v) for v in box), 1.0) for t, box in texts]
    index = {id(ln): i for i, ln in enumerate(lines)}
    return [texts[index[id(ln)]] for row in rows(lines) for ln in row]


def bar_chart(rng: random.Random, split: str, novel: float = 0.0,
              novel_rng: random.Random | None = None) -> Sample:
    """`novel`, `novel_rng`: in the train split, with probability `novel` the bars are
    labelled with made-up words of 3-5 letters (`novel_word`), which a model can only
    answer from what it reads or is given to read (0 draws exactly as before)."""
    from PIL import ImageDraw

    img = _canvas(rng)
    d = ImageDraw.Draw(img)
    k = rng.randint(3, 5)
    labels = rng.sample([w for w in words(split) if len(w) <= 5], k)
    if novel_rng is not None and split != "test" and novel_rng.random() < novel:
        made: list[str] = []
        while len(made) < k:
            w = novel_word(novel_rng)
            if len(w) <= 5 and w not in made:
                made.append(w)
        labels = made
    values = [rng.randint(1, 9) for _ in range(k)]
    while values.count(max(values)) > 1:
        values[values.index(max(values))] -= 1
    color = COLORS[rng.choice(["blue", "green", "orange", "purple", "red"])]
    f = font("DejaVuSans.ttf", 9)
    base, top, left = 140, 20, 14
    d.line((left, top, left, base), fill=(0, 0, 0))
    d.line((left, base, IMAGE_SIZE - 6, base), fill=(0, 0, 0))
    slot = (IMAGE_SIZE - left - 10) / k
    texts = []
    for i, (label, v) in enumerate(zip(labels, values, strict=True)):
        x = left + 4 + i * slot
        h = (base - top) * v / 9
        d.rectangle((x, base - h, x + slot * 0.6, base), fill=color)
        d.text((x, base + 3), label, fill=(0, 0, 0), font=f)
        d.text((x + slot * 0.15, base - h - 11), str(v), fill=(0, 0, 0), font=f)
        texts += [(label, _text_box(d, (x, base + 3), label, f)),
                  (str(v), _text_box(d, (x + slot * 0.15, base - h - 11), str(v), f))]
    kind = rng.choice(["highest", "value", "describe"])
    # the text in reading order, as the server's OCR gives it (values above the bars
    # first, top to bottom, then the row of labels); the OCR misses many of the lone
    # digits (2 of 5 on held-out charts), which `simulated_ocr` imitates
    meta = {"text_boxes": reading_order(texts), "ocr_drop_short": 0.4}
    if kind == "highest":
        return Sample(img, "explain", "Which bar is the highest?",
                      labels[values.index(max(values))], "chart", meta)
    if kind == "value":
        i = rng.randrange(k)
        return Sample(img, "explain", f"What is the value of {labels[i]}?", str(values[i]),
                      "chart", meta)
    pairs = ", ".join(f"{a} {v}" for a, v in zip(labels, values, strict=True))
    return Sample(img, "explain", None, f"A bar chart: {pairs}.", "chart", meta)


# -- code and errors -----------------------------------------------------------------------

CODE_LINES = ["def {a}({b}):", "    return {b} + {n}", "{a} = {b}({n})", "for i in range({n}):",
              "if {b} > {n}:", "    print({a})", "int {a} = {n};", "return {a};",
              "x = {a}.{b}()", "while {a}:", "{a}.append({n})", "let {a} = {n};",
              "fn {a}() {{", "}}", "# {a} {b}", "// {a} {b}"]


def _renamer(novel_rng: random.Random | None, split: str, novel: float):
    """The word substitution a code screenshot or an error dialog applies: in the train
    split, with probability `novel`, each word becomes a made-up one (`novel_word`; the
    same word, the same substitute), so that a long run cannot learn the answers of the 55
    training words by heart instead of reading them (held-out pictures carry words never
    trained on). `novel_rng` is the sample's own, so the rest of the picture is drawn as
    without it."""
    if novel_rng is None or split == "test" or novel_rng.random() >= novel:
        return lambda w: w
    table: dict[str, str] = {}

    def rename(w: str) -> str:
        if w not in table:
            t = novel_word(novel_rng)
            while t in table.values():
                t = novel_word(novel_rng)
            table[w] = t
        return table[w]
    return rename


def code(rng: random.Random, split: str, novel: float = 0.0,
         novel_rng: random.Random | None = None) -> Sample:
    """`novel`, `novel_rng`: see `_renamer` (0 draws exactly as before)."""
    from PIL import ImageDraw

    dark = rng.random() < 0.5
    img = _canvas(rng, dark)
    d = ImageDraw.Draw(img)
    fg = (220, 220, 220) if dark else (20, 20, 20)
    size = rng.choice([11, 12, 13])
    f = font(rng.choice(FONTS), size)
    pool = words(split)
    rename = _renamer(novel_rng, split, novel)
    lines = []
    for _ in range(rng.randint(2, 4)):
        t = rng.choice(CODE_LINES)
        line = t.format(a=rename(rng.choice(pool)), b=rename(rng.choice(pool)),
                        n=rng.randint(0, 99))
        lines.append(line[:18])
    y = rng.randint(6, 20)
    texts = []
    for line in lines:
        d.text((6, y), line, fill=fg, font=f)
        texts.append((line, _text_box(d, (6, y), line, f)))
        y += size + 5
    text = "\n".join(lines)
    return Sample(img, "transcribe", None, text, "transcribe",
                  {"text": text, "text_boxes": texts})


def error_dialog(rng: random.Random, split: str, novel: float = 0.0,
                 novel_rng: random.Random | None = None) -> Sample:
    """`novel`, `novel_rng`: see `_renamer` (0 draws exactly as before)."""
    from PIL import ImageDraw

    img = _canvas(rng)
    d = ImageDraw.Draw(img)
    message, explanation = rng.choice(ERRORS)
    w = _renamer(novel_rng, split, novel)(rng.choice(words(split)))
    message, explanation = message.format(w=w), explanation.format(w=w)
    d.rectangle((8, 30, 152, 120), fill=(250, 250, 250), outline=(120, 120, 120))
    d.rectangle((8, 30, 152, 46), fill=(200, 40, 40))
    d.text((12, 32), "Error", fill=(255, 255, 255), font=font("DejaVuSans.ttf", 11))
    f = font("DejaVuSans.ttf", 10)
    lines, cur = [], ""
    for word in message.split(" "):  # wrap to the dialog's width
        trial = (cur + " " + word).strip()
        if d.textlength(trial, font=f) > 136 and cur:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    lines.append(cur)
    texts = [("Error", _text_box(d, (12, 32), "Error", font("DejaVuSans.ttf", 11)))]
    for i, line in enumerate(lines[:5]):
        d.text((12, 52 + i * 13), line, fill=(20, 20, 20), font=f)
        texts.append((line, _text_box(d, (12, 52 + i * 13), line, f)))
    if rng.random() < 0.5:
        return Sample(img, "transcribe", None, "\n".join(lines[:5]), "transcribe",
                      {"text": "\n".join(lines[:5]), "text_boxes": texts})
    return Sample(img, "explain", None, f"{message}. {explanation}", "error",
                  {"text_boxes": texts})


GENERATORS = ((shapes, 0.45), (flowchart, 0.2), (bar_chart, 0.12), (code, 0.13),
              (error_dialog, 0.1))


def sample(split: str, seed: int, novel_words: float = 0.0, novel_text: float = 0.0,
           novel_vocab: float = 0.4, novel_pieces: float = 0.0) -> Sample:
    """Sample number `seed` of `split` ("train" or "test"); `novel_words`: see flowchart;
    `novel_text`: the same for code screenshots and error dialogs (see `_renamer`);
    `novel_vocab`: the share of vocabulary words among a diagram's made-up labels;
    `novel_pieces`: the share of labels made of any vocabulary tokens (`piece_word`)."""
    rng = random.Random(f"{split}:{seed}")
    r, acc = rng.random(), 0.0
    gen = GENERATORS[-1][0]
    for g, weight in GENERATORS:
        acc += weight
        if r < acc:
            gen = g
            break
    if gen is flowchart and novel_words > 0:
        return flowchart(rng, split, novel_words, novel_vocab, novel_pieces)
    if gen in (code, error_dialog) and novel_text > 0:
        return gen(rng, split, novel_text, random.Random(f"{split}:novel-text:{seed}"))
    return gen(rng, split)


# -- OCR input for training (simulated from the drawn text) ---------------------------------

# What a real OCR confuses in code and UI text (each way round).
CONFUSIONS = (("O", "0"), ("l", "1"), ("I", "l"), ("S", "5"), (";", ":"), (".", ","),
              ("'", "`"), ("rn", "m"), ("{", "("), ("}", ")"), ("B", "8"), ("Z", "2"))


def _noisy(text: str, rng: random.Random, noise: float) -> str:
    out = " ".join(text.split())  # OCR reads runs of spaces as one
    for a, b in CONFUSIONS:
        for src, dst in ((a, b), (b, a)):
            if src in out and rng.random() < noise * out.count(src):
                i = rng.choice([m for m in range(len(out)) if out.startswith(src, m)])
                out = out[:i] + dst + out[i + len(src):]
    if " " in out and rng.random() < noise * 2:  # a space missed
        spaces = [i for i, ch in enumerate(out) if ch == " "]
        i = rng.choice(spaces)
        out = out[:i] + out[i + 1:]
    return out


def simulated_ocr(s: Sample, rng: random.Random, noise: float = 0.03
                  ) -> list[tuple[str, list[int]]]:
    """OCR lines for a training sample, made from the text the generator drew: each line
    (text, [x1, y1, x2, y2] in 0-1000), with the kinds of error a real OCR makes at rate
    `noise`: confusable characters, a missed space, a missed line, boxes a few units off.
    `formats.ocr_context` turns them into the prompt's OCR block; with them a model learns
    to quote and ground the text it is shown, as the server gives it real OCR lines."""
    out = []
    drop_short = float(s.meta.get("ocr_drop_short", 0.0))
    for text, box in s.meta.get("text_boxes", []):
        if rng.random() < noise / 2 or len(text) <= 2 and rng.random() < drop_short:
            continue
        j = max(1, round(1000 / IMAGE_SIZE))  # about a pixel
        jb = [min(1000, max(0, v + rng.randint(-2 * j, 2 * j))) for v in box]
        out.append((_noisy(text, rng, noise), [min(jb[0], jb[2]), min(jb[1], jb[3]),
                                               max(jb[0], jb[2]), max(jb[1], jb[3])]))
    return out


def training_prompt(s: Sample, rng: random.Random | None = None, ocr_rate: float = 0.0,
                    noise: float = 0.03) -> str:
    """The prompt of a sample as `vlm.py` trains it; with probability `ocr_rate` it carries
    simulated OCR lines (0, the default, is the prompt the current default VLM learned)."""
    from codevista.models import formats

    question = formats.vision_question(s.task, s.question)
    ocr = ""
    if ocr_rate > 0 and rng is not None and rng.random() < ocr_rate:
        ocr = formats.ocr_context(simulated_ocr(s, rng, noise))
    return formats.vision_prompt(question, ocr=ocr)


# -- screenshot-size pictures (OCR evaluation) ----------------------------------------------

def render_code(text: str, font_name: str = "DejaVuSansMono.ttf", size: int = 14,
                dark: bool = False, margin: int = 12, tab: int = 4):
    """An editor-like screenshot of code: one line per text line at 1.5x the font size,
    tabs expanded. Returns (image, the text as drawn)."""
    from PIL import Image, ImageDraw

    lines = text.expandtabs(tab).split("\n")
    f = font(font_name, size)
    pitch = round(size * 1.5)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([probe.textlength(ln, font=f) for ln in lines] + [size])
    bg, fg = ((30, 30, 30), (212, 212, 212)) if dark else ((255, 255, 255), (30, 30, 30))
    img = Image.new("RGB", (int(width) + 2 * margin, pitch * len(lines) + 2 * margin), bg)
    d = ImageDraw.Draw(img)
    for i, ln in enumerate(lines):
        d.text((margin, margin + i * pitch), ln, fill=fg, font=f)
    return img, "\n".join(lines)


def render_dialog(title: str, message: str, width: int = 460, size: int = 15,
                  font_name: str = "DejaVuSans.ttf", accent=(200, 40, 40)):
    """An error dialog: a title bar, a round "!" icon, the message wrapped to the dialog's
    width (lines of the message kept), an OK button. Returns (image, the lines drawn)."""
    from PIL import Image, ImageDraw

    f, fb = font(font_name, size), font("DejaVuSans-Bold.ttf", size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_x, room = 76, width - 76 - 18
    lines: list[str] = []
    for para in message.split("\n"):
        cur = ""
        for word in para.split(" "):
            trial = f"{cur} {word}" if cur else word
            if cur and probe.textlength(trial, font=f) > room:
                lines.append(cur)
                cur = word
            else:
                cur = trial
        lines.append(cur)
    pitch = round(size * 1.45)
    bar = size + 16
    height = bar + 24 + pitch * len(lines) + 58
    img = Image.new("RGB", (width, height), (236, 236, 236))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, width - 1, height - 1), outline=(120, 120, 120))
    d.rectangle((1, 1, width - 2, bar), fill=(60, 64, 72))
    d.text((12, 8), title, fill=(255, 255, 255), font=fb)
    d.ellipse((20, bar + 20, 56, bar + 56), fill=accent)
    d.text((34, bar + 26), "!", fill=(255, 255, 255), font=font("DejaVuSans-Bold.ttf", 22))
    for i, ln in enumerate(lines):
        d.text((text_x, bar + 22 + i * pitch), ln, fill=(20, 20, 20), font=f)
    bx = width - 96
    by = height - 44
    d.rectangle((bx, by, bx + 76, by + 30), fill=(250, 250, 250), outline=(110, 110, 110))
    d.text((bx + 26, by + 6), "OK", fill=(20, 20, 20), font=f)
    return img, lines
