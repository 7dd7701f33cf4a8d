"""Document positions and snapshots.

LSP positions count characters in the negotiated encoding (UTF-16 code units unless the
client chose UTF-8 or UTF-32). Conversion is strict: a line past the end of the document,
a character past the end of its line, or a position inside a surrogate pair (or inside a
UTF-8 sequence) is an error the client hears about, never a silent clamp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_EOL = re.compile(r"\r\n|\r|\n")


class PositionError(ValueError):
    """A position that does not exist in the document."""


def _units(ch: str, encoding: str) -> int:
    cp = ord(ch)
    if encoding == "utf-8":
        return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4
    if encoding == "utf-32":
        return 1
    return 2 if cp >= 0x10000 else 1


def line_starts(text: str) -> list[int]:
    """Offsets where each line begins (a trailing newline starts one more, empty line)."""
    return [0, *(m.end() for m in _EOL.finditer(text))]


def line_content(text: str, starts: list[int], line: int) -> str:
    end = starts[line + 1] if line + 1 < len(starts) else len(text)
    return text[starts[line]:end].rstrip("\r\n")


_CODECS = {"utf-16": ("utf-16-le", 2), "utf-8": ("utf-8", 1), "utf-32": ("utf-32-le", 4)}


def to_offset(text: str, line: int, character: int, encoding: str = "utf-16") -> int:
    """String index of an LSP position; PositionError if the position does not exist.

    The line is encoded once (C speed: an 8 MB line costs milliseconds, not seconds) and
    the position's code units decoded back to count the characters before it."""
    starts = line_starts(text)
    if line < 0 or character < 0:
        raise PositionError(f"negative position {line}:{character}")
    if line >= len(starts):
        raise PositionError(f"line {line} is past the end of the document "
                            f"({len(starts)} lines)")
    content = line_content(text, starts, line)
    codec, width = _CODECS.get(encoding, _CODECS["utf-16"])
    data = content.encode(codec, errors="surrogatepass")
    units = len(data) // width
    if character > units:
        raise PositionError(f"character {character} is past the end of line {line} "
                            f"({units} {encoding} units)")
    at = character * width
    if at < len(data):
        unit = int.from_bytes(data[at:at + width], "little")
        prev = int.from_bytes(data[at - width:at], "little") if at else 0
        inside = (0xDC00 <= unit <= 0xDFFF and 0xD800 <= prev <= 0xDBFF
                  if encoding == "utf-16" else 0x80 <= unit <= 0xBF and encoding == "utf-8")
        if inside:
            raise PositionError(f"character {character} of line {line} is inside a "
                                f"character ({encoding} units)")
    return starts[line] + len(data[:at].decode(codec, errors="surrogatepass"))


def apply_changes(text: str, changes: list[Any], encoding: str = "utf-16") -> str:
    """The text after a `didChange`'s content changes, applied in order (each range refers
    to the text the previous change left). A change whose range does not exist in the
    document (a line or character past the end, inside a character, start after end)
    raises PositionError and none of the changes apply: the caller keeps the old text
    rather than a silently clamped one that no longer matches the editor's."""
    for change in changes:
        rng = getattr(change, "range", None)
        new_text = change.text
        if rng is None:  # a whole-document change
            text = new_text
            continue
        a = to_offset(text, rng.start.line, rng.start.character, encoding)
        b = to_offset(text, rng.end.line, rng.end.character, encoding)
        if a > b:
            raise PositionError(f"range start {rng.start.line}:{rng.start.character} is after "
                                f"its end {rng.end.line}:{rng.end.character}")
        text = text[:a] + new_text + text[b:]
    return text


def to_position(text: str, offset: int, encoding: str = "utf-16") -> tuple[int, int]:
    starts = line_starts(text)
    line = max(i for i, s in enumerate(starts) if s <= offset)
    col = sum(_units(ch, encoding) for ch in text[starts[line]:offset])
    return line, col


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of a document at one cursor position."""

    uri: str
    version: int | None
    text: str
    language_id: str
    offset: int

    @property
    def prefix(self) -> str:
        return self.text[:self.offset]

    @property
    def suffix(self) -> str:
        return self.text[self.offset:]

    @property
    def line_prefix(self) -> str:
        return self.prefix.rsplit("\n", 1)[-1]

    @property
    def line_suffix(self) -> str:
        return self.suffix.split("\n", 1)[0]
