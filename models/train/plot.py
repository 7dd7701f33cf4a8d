"""A loss-curve PNG drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"train": (31, 119, 180), "valid": (214, 39, 40)}


def plot_losses(series: dict[str, list[tuple[int, float]]], out: Path, title: str) -> None:
    w, h, m = 900, 500, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    points = [p for s in series.values() for p in s]
    if not points:
        img.save(out)
        return
    x0, x1 = 0, max(1, max(p[0] for p in points))
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    y1 = y1 if y1 > y0 else y0 + 1

    def xy(step: int, loss: float) -> tuple[float, float]:
        return (m + (step - x0) / (x1 - x0) * (w - 2 * m),
                h - m - (loss - y0) / (y1 - y0) * (h - 2 * m))

    d.rectangle([m, m, w - m, h - m], outline="black")
    for i in range(6):
        loss = y0 + (y1 - y0) * i / 5
        _, y = xy(0, loss)
        d.line([m - 5, y, m, y], fill="black")
        d.text((5, y - 6), f"{loss:.2f}", fill="black")
        step = int(x0 + (x1 - x0) * i / 5)
        x, _ = xy(step, y0)
        d.line([x, h - m, x, h - m + 5], fill="black")
        d.text((x - 15, h - m + 8), str(step), fill="black")
    d.text((w // 2 - 100, 15), title, fill="black")
    d.text((w // 2 - 20, h - 20), "step", fill="black")
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS.get(name, (0, 0, 0))
        if len(pts) > 1:
            d.line([xy(s, v) for s, v in pts], fill=color, width=2)
        d.text((w - m - 120, m + 10 + 15 * i), f"{name} loss", fill=color)
    img.save(out)
