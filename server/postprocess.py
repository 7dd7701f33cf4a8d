"""From raw model text to the suggestion an editor shows.

Multi-line policy: with text after the cursor on its line, one line; at the end of a line
or on a blank line, a block that ends at the dedent closing it (or a blank-line gap).
A block also ends where the model starts repeating the last one to three lines.
Clean-up: no trailing whitespace, no repeat of the text after the cursor, no line that
just repeats a neighbouring line.
"""

from __future__ import annotations

from dataclasses import dataclass

from .documents import Snapshot

MAX_BLOCK_LINES = 12


def _repeat_period(lines: list[str], longest: int = 3) -> int:
    """p if the last p non-blank lines repeat the p before them (a model looping), else 0."""
    body = [line.strip() for line in lines if line.strip()]
    for p in range(1, longest + 1):
        if len(body) >= 2 * p and body[-p:] == body[-2 * p:-p]:
            return p
    return 0


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


@dataclass(frozen=True)
class Policy:
    single_line: bool
    base_indent: int  # a block ends at a non-empty line indented less than this

    @classmethod
    def for_snapshot(cls, snap: Snapshot) -> Policy:
        single = snap.line_suffix.strip() != ""
        line = snap.line_prefix
        if line.strip():
            base = _indent(line)
            # After an opening line (`def f():`, `if x {`) the block is the body.
            if line.rstrip().endswith((":", "{", "(", "[")):
                base += 1
        else:
            base = len(line)
        return cls(single_line=single, base_indent=base)

    def cut(self, text: str) -> tuple[str, bool]:
        """The part of `text` to keep, and whether generation can stop (it is complete)."""
        if self.single_line:
            i = text.find("\n")
            return (text, False) if i < 0 else (text[:i], True)
        lines = text.split("\n")
        kept: list[str] = []
        blank_run = 0
        for n, line in enumerate(lines):
            complete = n < len(lines) - 1  # the last piece may still grow
            if n > 0 and line.strip() and complete and _indent(line) < self.base_indent:
                return "\n".join(kept), True
            if not line.strip():
                blank_run += 1
                if blank_run >= 2 and complete:
                    return "\n".join(kept), True
            else:
                blank_run = 0
            kept.append(line)
            if complete:
                period = _repeat_period(kept)
                if period:  # the model is looping: drop the repeated lines
                    nonblank = [i for i, k in enumerate(kept) if k.strip()]
                    return "\n".join(kept[:nonblank[-period]]).rstrip("\n"), True
            if len(kept) >= MAX_BLOCK_LINES and complete:
                return "\n".join(kept), True
        return "\n".join(kept), False


def finish(text: str, snap: Snapshot) -> str:
    """Final clean-up of a suggestion; "" when there is nothing worth showing."""
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if lines and snap.line_prefix and not snap.line_prefix.strip():
        # The cursor sits after the indentation already typed: the first line needs none.
        lines[0] = lines[0].lstrip(" \t")
    text = "\n".join(lines)
    if not text.strip():
        return ""
    # Do not re-type what already follows the cursor (e.g. the closing bracket).
    after = snap.line_suffix.rstrip()
    if after:
        for k in range(min(len(after), len(text)), 0, -1):
            if text.endswith(after[:k]) and (k == len(after) or not after[k:].strip()):
                text = text[:-k]
                break
        if after.startswith(text.strip()) and "\n" not in text:
            return ""
    # A suggestion that just repeats the line above or below is noise.
    first = (snap.line_prefix + text.split("\n")[0]).strip()
    before_lines = snap.prefix.split("\n")
    above = before_lines[-2].strip() if len(before_lines) > 1 else None
    below_lines = snap.suffix.split("\n")
    below = below_lines[1].strip() if len(below_lines) > 1 else None
    if first and first in (above, below) and "\n" not in text:
        return ""
    return text.rstrip()


def end_of_definition(code: str) -> str:
    """`code` up to the end of its first top-level definition in a brace language: the
    brace that closes the first `{`, or a `;` before any brace (an abstract method).
    String and character literals are skipped. The whole text if neither is found."""
    depth, opened, quote, i = 0, False, "", 0
    while i < len(code):
        ch = code[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "{":
            depth, opened = depth + 1, True
        elif ch == "}":
            depth -= 1
            if opened and depth <= 0:
                return code[:i + 1]
        elif ch == ";" and not opened:
            return code[:i + 1]
        i += 1
    return code
