"""A terminal capture of the plugin at work: Neovim in tmux, the real server, ghost text.

    python editor-clients/nvim/screenshot.py OUT.png [--nvim PATH]

Starts Neovim (isolated config) inside a detached tmux session, types into a Python file,
waits for the ghost text, captures the pane with its colours (`tmux capture-pane -e`) and
draws it into a PNG with a monospace font.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent
COLS, ROWS = 90, 22
BASE16 = [(0, 0, 0), (205, 49, 49), (13, 188, 121), (229, 229, 16), (36, 114, 200),
          (188, 63, 188), (17, 168, 205), (229, 229, 229), (102, 102, 102), (241, 76, 76),
          (35, 209, 139), (245, 245, 67), (59, 142, 234), (214, 112, 214), (41, 184, 219),
          (255, 255, 255)]


def xterm256(n: int) -> tuple[int, int, int]:
    if n < 16:
        return BASE16[n]
    if n < 232:
        n -= 16
        steps = [0, 95, 135, 175, 215, 255]
        return steps[n // 36], steps[(n // 6) % 6], steps[n % 6]
    v = 8 + (n - 232) * 10
    return v, v, v


def parse(capture: str) -> list[list[tuple[str, tuple, tuple]]]:
    """Rows of (char, fg, bg) from text with SGR escapes."""
    fg0, bg0 = (220, 220, 220), (30, 30, 30)
    rows = []
    for line in capture.split("\n")[:ROWS]:
        fg, bg, row, i = fg0, bg0, [], 0
        while i < len(line):
            m = re.match(r"\x1b\[([0-9;]*)m", line[i:])
            if m:
                codes = [int(c) if c else 0 for c in m.group(1).split(";")]
                k = 0
                while k < len(codes):
                    c = codes[k]
                    if c == 0:
                        fg, bg = fg0, bg0
                    elif 30 <= c <= 37 or 90 <= c <= 97:
                        fg = BASE16[c - 30 if c < 90 else c - 82]
                    elif 40 <= c <= 47:
                        bg = BASE16[c - 40]
                    elif c in (38, 48) and k + 1 < len(codes):
                        if codes[k + 1] == 5 and k + 2 < len(codes):
                            col = xterm256(codes[k + 2])
                            k += 2
                        elif codes[k + 1] == 2 and k + 4 < len(codes):
                            col = tuple(codes[k + 2:k + 5])
                            k += 4
                        else:
                            col = fg0
                        fg, bg = (col, bg) if c == 38 else (fg, col)
                    elif c == 39:
                        fg = fg0
                    elif c == 49:
                        bg = bg0
                    k += 1
                i += m.end()
                continue
            row.append((line[i], fg, bg))
            i += 1
        rows.append(row)
    return rows


def render(rows, out: Path) -> None:
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.truetype("DejaVuSansMono.ttf", 15)
    except OSError:
        font = ImageFont.load_default(size=15)
    cw, ch = 9, 19
    img = Image.new("RGB", (COLS * cw + 16, ROWS * ch + 16), (30, 30, 30))
    d = ImageDraw.Draw(img)
    for y, row in enumerate(rows):
        for x, (c, fg, bg) in enumerate(row):
            if bg != (30, 30, 30):
                d.rectangle((8 + x * cw, 8 + y * ch, 8 + (x + 1) * cw, 8 + (y + 1) * ch), fill=bg)
            d.text((8 + x * cw, 8 + y * ch), c, fill=fg, font=font)
    img.save(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--nvim", default=shutil.which("nvim"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "main.py").write_text("import math\n\n\ndef area(radius):\n")
        init = work / "init.lua"
        init.write_text(f"""
vim.opt.rtp:prepend({str(PLUGIN)!r})
vim.opt.termguicolors = true
vim.cmd("colorscheme habamax")
require("codevista").setup({{ cmd = {{ {sys.executable!r}, "-m", "codevista.server.cli",
  "serve" }}, settings = {{ maxTokens = 32 }} }})
""")
        session = "codevista-shot"
        env = f"XDG_STATE_HOME={tmp}/s XDG_DATA_HOME={tmp}/d XDG_CONFIG_HOME={tmp}/c"
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", str(COLS), "-y",
                        str(ROWS), "-c", tmp,
                        f"env {env} {args.nvim} -i NONE -u {init} main.py"], check=True)
        try:
            time.sleep(4)  # the server starts and loads the model
            for keys in (["G", "o"], ["return "]):
                subprocess.run(["tmux", "send-keys", "-t", session, "-l", "".join(keys)])
                time.sleep(0.3)
            time.sleep(3)
            cap = subprocess.run(["tmux", "capture-pane", "-t", session, "-p", "-e"],
                                 capture_output=True, text=True, check=True).stdout
        finally:
            subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
        render(parse(cap), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
