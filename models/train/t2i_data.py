"""Prompts and pictures the text-to-image model learns from, and the checks that grade it.

Three kinds of picture, drawn with Pillow at 4x and reduced to `IMAGE_SIZE` square, with
the colours, shapes, words and arrows of the vision model's generators (vlm_data.py):
- shapes: 1-5 filled circles, squares or triangles in seven colours, each centred in one
  cell of a 3x3 layout named in the prompt ("2 shapes: a red circle top left, a blue
  square bottom right");
- flowcharts: 2-4 outlined boxes in a row (or a column) joined by grey arrows, one box
  filled with a colour ("a flowchart: parse -> check -> save, with check in red");
- bar charts: 3-5 bars of one colour with values 1-9 ("a blue bar chart: 3, 7, 2").

A sample is a pure function of (split, seed). Held-out prompts are never drawn in
training: shape and chart prompts belong to the test split by a hash of their text (one in
eight), flowcharts use the held-out label words (`vlm_data.HELDOUT_WORDS`).

`analyse` reads a picture back with plain image analysis (each pixel snapped to the
nearest palette colour, then connected components), and `grade` says whether the count,
the colours and the layout the prompt asked for are there.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .vlm_data import COLORS, SHAPES, _arrow, words

IMAGE_SIZE = 64
SCALE = 4  # drawn at IMAGE_SIZE * SCALE, then reduced (anti-aliased edges)
CELLS = ("top left", "top", "top right", "left", "centre", "right", "bottom left",
         "bottom", "bottom right")
BAR_COLORS = ("blue", "green", "orange", "purple", "red")
BACKGROUND = (255, 255, 255)
ARROW = (150, 150, 150)
OUTLINE = COLORS["black"]
HELDOUT_BUCKETS = 8  # one prompt in eight is held out


@dataclass
class Scene:
    prompt: str
    kind: str  # shapes | flowchart | chart
    image: Any  # PIL.Image.Image, RGB, IMAGE_SIZE square
    meta: dict[str, Any] = field(default_factory=dict)


def held_out(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % HELDOUT_BUCKETS == 0


def _canvas():
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (IMAGE_SIZE * SCALE,) * 2, BACKGROUND)
    return img, ImageDraw.Draw(img)


def _reduce(img):
    from PIL import Image

    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


# -- shapes ---------------------------------------------------------------------------------

def cell_centre(cell: int) -> tuple[float, float]:
    """Centre of layout cell 0-8 (reading order) in output pixels."""
    step = IMAGE_SIZE / 3
    return (cell % 3 + 0.5) * step, (cell // 3 + 0.5) * step


def draw_shape(d, shape: str, color: str, cx: float, cy: float, size: float) -> None:
    s, h = size * SCALE, size * SCALE / 2
    x, y = cx * SCALE - h, cy * SCALE - h
    fill = COLORS[color]
    if shape == "circle":
        d.ellipse((x, y, x + s, y + s), fill=fill)
    elif shape == "square":
        d.rectangle((x, y, x + s, y + s), fill=fill)
    else:
        d.polygon([(x + h, y), (x, y + s), (x + s, y + s)], fill=fill)


def shapes_prompt(objs: list[tuple[int, str, str]]) -> str:
    parts = ", ".join(f"a {color} {shape} {CELLS[cell]}" for cell, color, shape in objs)
    n = len(objs)
    return f"{n} shape{'s' * (n != 1)}: {parts}"


def shapes(rng: random.Random) -> Scene:
    n = rng.randint(1, 5)
    cells = sorted(rng.sample(range(9), n))
    objs = [(c, rng.choice(list(COLORS)), rng.choice(SHAPES)) for c in cells]
    img, d = _canvas()
    for cell, color, shape in objs:
        draw_shape(d, shape, color, *cell_centre(cell), 13)
    return Scene(shapes_prompt(objs), "shapes", _reduce(img),
                 {"objects": [{"cell": c, "color": col, "shape": s} for c, col, s in objs]})


# -- flowcharts -----------------------------------------------------------------------------

def flowchart_boxes(k: int, vertical: bool) -> list[tuple[float, float, float, float]]:
    """k boxes (x1, y1, x2, y2) in output pixels, evenly spread along a row or column."""
    long_side, short_side = 11.0, 9.0
    step = IMAGE_SIZE / k
    boxes = []
    for i in range(k):
        c = (i + 0.5) * step
        w = min(long_side, step - 5) / 2
        box = ((c - w, 32 - short_side / 2, c + w, 32 + short_side / 2) if not vertical
               else (32 - long_side / 2 - 3, c - w * 0.8, 32 + long_side / 2 + 3, c + w * 0.8))
        boxes.append(tuple(float(round(v)) for v in box))
    return boxes


def flowchart(rng: random.Random, split: str) -> Scene:
    k = rng.randint(2, 4)
    vertical = rng.random() < 0.3
    labels = rng.sample(words(split), k)
    hot = rng.randrange(k)
    color = rng.choice([c for c in COLORS if c != "black"])
    boxes = flowchart_boxes(k, vertical)
    img, d = _canvas()
    sc = [tuple(v * SCALE for v in b) for b in boxes]
    for i, b in enumerate(sc):
        d.rectangle((b[0], b[1], b[2] - 1, b[3] - 1), outline=OUTLINE, width=2 * SCALE,
                    fill=COLORS[color] if i == hot else None)
    for a, b in zip(sc, sc[1:], strict=False):
        if vertical:
            start, end = ((a[0] + a[2]) / 2, a[3] + SCALE), ((b[0] + b[2]) / 2, b[1] - SCALE)
        else:
            start, end = (a[2] + SCALE, (a[1] + a[3]) / 2), (b[0] - SCALE, (b[1] + b[3]) / 2)
        for off in range(-SCALE // 2, SCALE // 2 + 1):  # a line about one pixel wide
            s2 = (start[0], start[1] + off) if not vertical else (start[0] + off, start[1])
            e2 = (end[0], end[1] + off) if not vertical else (end[0] + off, end[1])
            _arrow(d, s2, e2, ARROW)
    word = "vertical flowchart" if vertical else "flowchart"
    prompt = f"a {word}: {' -> '.join(labels)}, with {labels[hot]} in {color}"
    return Scene(prompt, "flowchart", _reduce(img),
                 {"k": k, "hot": hot, "color": color, "vertical": vertical})


# -- bar charts -----------------------------------------------------------------------------

BAR_BASE, BAR_TOP = 58, 8


def bar_chart(rng: random.Random) -> Scene:
    k = rng.randint(3, 5)
    values = [rng.randint(1, 9) for _ in range(k)]
    color = rng.choice(BAR_COLORS)
    img, d = _canvas()
    s = SCALE
    d.rectangle((4 * s, BAR_TOP * s, 5 * s - 1, (BAR_BASE + 1) * s - 1), fill=OUTLINE)
    d.rectangle((4 * s, BAR_BASE * s, 62 * s - 1, (BAR_BASE + 1) * s - 1), fill=OUTLINE)
    slot = 56 / k
    for i, v in enumerate(values):
        x = 7 + i * slot
        h = (BAR_BASE - BAR_TOP) * v / 9
        d.rectangle((x * s, (BAR_BASE - h) * s, (x + slot * 0.6) * s, BAR_BASE * s - s),
                    fill=COLORS[color])
    prompt = f"a {color} bar chart: {', '.join(map(str, values))}"
    return Scene(prompt, "chart", _reduce(img), {"values": values, "color": color})


KINDS = (("shapes", 0.6), ("flowchart", 0.2), ("chart", 0.2))


def scene(split: str, seed: int, kind: str | None = None) -> Scene:
    """Scene number `seed` of `split` ("train" or "test"); `kind` forces one kind."""
    rng = random.Random(f"t2i:{split}:{seed}")
    if kind is None:
        r, acc = rng.random(), 0.0
        kind = KINDS[-1][0]
        for name, weight in KINDS:
            acc += weight
            if r < acc:
                kind = name
                break
    while True:
        if kind == "flowchart":
            return flowchart(rng, split)  # split by its label words
        s = shapes(rng) if kind == "shapes" else bar_chart(rng)
        if held_out(s.prompt) == (split == "test"):
            return s


# -- reading a picture back -----------------------------------------------------------------

PALETTE = {"background": BACKGROUND, "arrow": ARROW, **COLORS}


@dataclass(frozen=True)
class Component:
    color: str
    area: int
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 inclusive
    centre: tuple[float, float]

    @property
    def fill(self) -> float:
        """Area over box area: ~1 square, ~0.8 circle, ~0.5 triangle."""
        x1, y1, x2, y2 = self.box
        return self.area / ((x2 - x1 + 1) * (y2 - y1 + 1))


def snap(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) index into PALETTE of each pixel's colour.

    Each pixel is matched to the palette colour c whose blend with the white background,
    white + t (c - white), it lies closest to; it takes that colour when at least 55 % of it
    is the colour (t >= 0.55), else it is background (edges, grey arrows).
    """
    names = list(PALETTE)
    px = pixels.astype(np.float32) - np.float32(255)  # (H, W, 3), relative to white
    best = np.full(px.shape[:2], np.inf, dtype=np.float32)
    share = np.zeros(px.shape[:2], dtype=np.float32)
    out = np.full(px.shape[:2], names.index("background"))
    for i, n in enumerate(names):
        if n in ("background", "arrow"):
            continue
        d = np.array(PALETTE[n], dtype=np.float32) - 255  # (3,)
        t = np.clip(px @ d / (d @ d), 0.0, 1.0)  # (H, W)
        resid = ((px - t[..., None] * d) ** 2).sum(-1)
        take = resid < best
        out[take], share[take], best[take] = i, t[take], resid[take]
    out[share < 0.55] = names.index("background")
    return out


def components(image, min_area: int = 6) -> list[Component]:
    """Connected regions (4-neighbour) of one palette colour, background and arrows left out."""
    px = np.asarray(image.convert("RGB"))
    labels = snap(px)
    names = list(PALETTE)
    h, w = labels.shape
    seen = np.zeros((h, w), dtype=bool)
    out: list[Component] = []
    skip = {names.index("background"), names.index("arrow")}
    for y0 in range(h):
        for x0 in range(w):
            c = labels[y0, x0]
            if seen[y0, x0] or c in skip:
                continue
            stack, pts = [(y0, x0)], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                pts.append((y, x))
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and labels[ny, nx] == c:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            if len(pts) < min_area:
                continue
            ys, xs = zip(*pts, strict=True)
            out.append(Component(names[c], len(pts), (min(xs), min(ys), max(xs), max(ys)),
                                 (sum(xs) / len(xs), sum(ys) / len(ys))))
    return out


def _cell_of(cx: float, cy: float) -> int:
    step = IMAGE_SIZE / 3
    return min(2, int(cy // step)) * 3 + min(2, int(cx // step))


def _shape_of(c: Component) -> str:
    f = c.fill
    return "square" if f > 0.9 else "circle" if f > 0.66 else "triangle"


def grade(scene: Scene, image) -> dict[str, bool]:
    """Whether `image` shows what `scene`'s prompt asked for: count, color, layout (and, for
    shapes, the shape of each object)."""
    comps = components(image)
    if scene.kind == "shapes":
        want = scene.meta["objects"]
        got = [c for c in comps if c.area >= 12]
        count = len(got) == len(want)
        color = sorted(c.color for c in got) == sorted(o["color"] for o in want)
        placed = sorted((_cell_of(*c.centre), c.color) for c in got)
        layout = placed == sorted((o["cell"], o["color"]) for o in want)
        shape = layout and sorted((_cell_of(*c.centre), _shape_of(c)) for c in got) == sorted(
            (o["cell"], o["shape"]) for o in want)
        return {"count": count, "color": color, "layout": layout, "shape": shape}
    if scene.kind == "flowchart":
        boxes = [c for c in comps if c.color == "black" and c.area >= 12]
        filled = [c for c in comps if c.color != "black" and c.area >= 6]
        count = len(boxes) == scene.meta["k"]
        color = len(filled) == 1 and filled[0].color == scene.meta["color"]
        axis = 1 if scene.meta["vertical"] else 0
        layout = False
        if count and color:
            order = sorted(boxes, key=lambda b: b.centre[axis])
            inside = [b.box[axis] <= filled[0].centre[axis] <= b.box[axis + 2] for b in order]
            layout = inside.index(True) == scene.meta["hot"] if any(inside) else False
        return {"count": count, "color": color, "layout": layout}
    values, want_color = scene.meta["values"], scene.meta["color"]
    bars = sorted((c for c in comps if c.color not in ("black",) and c.area >= 6),
                  key=lambda c: c.centre[0])
    count = len(bars) == len(values)
    color = bool(bars) and all(b.color == want_color for b in bars)
    unit = (BAR_BASE - BAR_TOP) / 9
    layout = count and all(abs((b.box[3] - b.box[1] + 1) / unit - v) <= 1.0
                           for b, v in zip(bars, values, strict=True))
    return {"count": count, "color": color, "layout": layout}
