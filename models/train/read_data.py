"""Reading pictures for the vision tower: lines of text drawn as the VLM's generators draw
them (the same fonts, sizes and themes: code lines, diagram labels in boxes, dialog
messages), with where each character is, so that every patch of the tower can be told which
characters it holds.

Why: the VLM's answers train the tower to read only through the decoder, a few answer
tokens a picture, and a small model trained that way learns the training words' pictures by
heart instead of their letters (held-out words come out as made-up ones). A per-patch
target says, for each of the 100 patches, which characters lie in it: dense supervision
of what the letters look like, from any text at all (`patch_targets`).

Never a held-out word in the train split (`vlm_data.novel_word` excludes them); the test
split draws its words from the held-out list and random letters.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .vlm_data import CODE_LINES, FONTS, HELDOUT_WORDS, IMAGE_SIZE, _canvas, font, novel_word

PATCH = 16
GRID = IMAGE_SIZE // PATCH
SLOTS = 4  # characters a patch can be told about, left to right (then top to bottom)
# class 0: no character in that slot; 1..94: the printable ASCII characters but space
CHARSET = "".join(chr(c) for c in range(33, 127))
NO_CHAR = 0
_SYMBOLS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
            "_.,:;()[]{}=+-*/<>'\"#!?%&|")


def char_class(c: str) -> int:
    i = CHARSET.find(c)
    return i + 1 if i >= 0 else NO_CHAR


@dataclass
class ReadSample:
    image: object  # PIL.Image.Image, RGB, IMAGE_SIZE square
    text: str  # the lines, joined with newlines
    chars: list[tuple[str, float, float]]  # (character, centre x, centre y) in pixels


def _word(rng: random.Random, split: str) -> str:
    if split == "test":
        if rng.random() < 0.5:
            return rng.choice(HELDOUT_WORDS)
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                       for _ in range(rng.randint(3, 7)))
    w = novel_word(rng, vocab=0.3, pieces=0.3)
    r = rng.random()
    if r < 0.1:
        return w.upper()
    if r < 0.25:
        return w.capitalize()
    return w


def _line(rng: random.Random, split: str) -> str:
    r = rng.random()
    if r < 0.6:
        t = rng.choice(CODE_LINES)
        return t.format(a=_word(rng, split), b=_word(rng, split), n=rng.randint(0, 999))
    if r < 0.8:
        return " ".join(_word(rng, split) for _ in range(rng.randint(1, 3)))
    return "".join(rng.choice(_SYMBOLS) if rng.random() > 0.15 else " "
                   for _ in range(rng.randint(3, 18))).strip() or "x"


def reading(rng: random.Random, split: str = "train") -> ReadSample:
    """A picture of 1-6 lines of text, or of 2-5 labels in boxes, with each character's
    centre."""
    from PIL import ImageDraw

    dark = rng.random() < 0.4
    img = _canvas(rng, dark)
    d = ImageDraw.Draw(img)
    g = rng.randint(0, 60)
    fg = (255 - g, 255 - g, 255 - g) if dark else (g, g, g)
    chars: list[tuple[str, float, float]] = []
    lines: list[str] = []

    def put(x: float, y: float, text: str, f) -> None:
        # cut where the picture ends: a transcription names only what is drawn
        while len(text) > 1 and x + d.textlength(text, font=f) > IMAGE_SIZE - 2:
            text = text[:-1]
        text = text.rstrip()
        d.text((x, y), text, fill=fg, font=f)
        top, bottom = d.textbbox((x, y), "Hg", font=f)[1::2]
        cy = (top + bottom) / 2
        for i, c in enumerate(text):
            if c == " ":
                continue
            left = x + d.textlength(text[:i], font=f)
            right = x + d.textlength(text[:i + 1], font=f)
            cx = (left + right) / 2
            if 0 <= cx < IMAGE_SIZE and 0 <= cy < IMAGE_SIZE:
                chars.append((c, cx, cy))
        lines.append(text)

    if rng.random() < 0.3:  # labels in boxes, as a flowchart draws them
        f = font("DejaVuSans.ttf", rng.choice((9, 10, 10, 11)))
        cells = rng.sample([(c, r) for c in range(3) for r in range(3)], rng.randint(2, 5))
        cells.sort(key=lambda cr: (cr[1], cr[0]))
        for c, r in cells:
            cx, cy = 27 + c * 53 + rng.randint(-3, 3), 27 + r * 53 + rng.randint(-3, 3)
            label = _word(rng, split)[:8]
            d.rectangle((cx - 24, cy - 10, cx + 24, cy + 10), outline=fg, width=1)
            w = d.textlength(label, font=f)
            put(cx - w / 2, cy - 6, label, f)
    else:
        size = rng.choice((9, 10, 11, 12, 13, 14))
        f = font(rng.choice(FONTS), size)
        x0 = rng.randint(2, 12)
        y = rng.randint(2, 24)
        for _ in range(rng.randint(1, 6)):
            if y + size > IMAGE_SIZE - 2:
                break
            text = _line(rng, split)[:rng.choice((18, 22, 26))]
            put(x0 + rng.randint(0, 8) * (rng.random() < 0.3), y, text, f)
            y += size + rng.randint(3, 8)
    return ReadSample(img, "\n".join(lines), chars)


def slots_for(patch: int) -> int:
    """Reading slots of a patch of that size: SLOTS for the recipe's 16 px, 2 for 8 px
    patches (a character or two of a line, rarely of two lines)."""
    return SLOTS if patch >= 12 else 2


def patch_targets(chars: list[tuple[str, float, float]], patch: int = PATCH,
                  slots: int = SLOTS) -> list[list[int]]:
    """For each of the grid x grid patches (row-major; `patch` px square, the tower's patch
    size), `slots` character classes: the characters whose centre lies in the patch, in
    reading order (by line, then x), then NO_CHAR. A patch with more keeps the first ones."""
    grid = IMAGE_SIZE // patch
    cells: list[list[tuple[float, float, int]]] = [[] for _ in range(grid * grid)]
    for c, x, y in chars:
        k = char_class(c)
        if k == NO_CHAR:
            continue
        cells[int(y) // patch * grid + int(x) // patch].append((round(y / 4), x, k))
    out = []
    for cell in cells:
        ks = [k for _, _, k in sorted(cell)][:slots]
        out.append(ks + [NO_CHAR] * (slots - len(ks)))
    return out
