"""Cross-language translation: languages, splitting, prompts per model family, clean-up.

Everything here is plain text processing, shared by the `codevista.translate` command,
the `codevista translate` CLI and benchmarks/translate.py:

- `Language` and `resolve_language`: the languages codevista translates between, with the
  names editors, users and Markdown fences give them;
- `split_units` / `plan_pieces`: source text cut at top-level definitions (then at nested
  ones, blank lines, lines) so that every piece fits the model's context;
- three prompt styles: the embedded model's trained template, an instruct checkpoint's chat
  template, and language-tag comments for base models;
- `clean_output` and `OutputCutter`: Markdown fences and chatter removed, generation stopped
  once the target has as many definitions as the source piece.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from codevista.models import formats


@dataclass(frozen=True)
class Language:
    id: str  # the LSP languageId, also the embedded model's tag
    name: str  # as people write it
    extension: str
    fence: str  # Markdown fence info string
    comment: str  # line comment
    braces: bool  # blocks are delimited by braces (else by indentation)
    aliases: tuple[str, ...] = ()


LANGUAGES: dict[str, Language] = {lang.id: lang for lang in (
    Language("python", "Python", ".py", "python", "#", False, ("py", "python3")),
    Language("java", "Java", ".java", "java", "//", True),
    Language("csharp", "C#", ".cs", "csharp", "//", True, ("c#", "cs", "c-sharp")),
    Language("c", "C", ".c", "c", "//", True),
    Language("cpp", "C++", ".cpp", "cpp", "//", True, ("c++", "cxx", "cc")),
    Language("javascript", "JavaScript", ".js", "javascript", "//", True,
             ("js", "javascriptreact", "jsx", "node")),
    Language("typescript", "TypeScript", ".ts", "typescript", "//", True,
             ("ts", "typescriptreact", "tsx")),
    Language("go", "Go", ".go", "go", "//", True, ("golang",)),
    Language("rust", "Rust", ".rs", "rust", "//", True, ("rs",)),
)}
assert set(LANGUAGES) == set(formats.LANGUAGES)

_LOOKUP = {k: lang for lang in LANGUAGES.values()
           for k in (lang.id, lang.name.lower(), *lang.aliases)}


class UnsupportedLanguageError(ValueError):
    """A language codevista does not translate to (or, for a model, from)."""


def supported_names() -> str:
    return ", ".join(f"{lang.name} ({lang.id})" for lang in LANGUAGES.values())


def resolve_language(name: object, role: str = "target") -> Language:
    if not isinstance(name, str) or not name.strip():
        raise UnsupportedLanguageError(f"a {role} language is required; supported: "
                                       f"{supported_names()}")
    lang = _LOOKUP.get(name.strip().lower())
    if lang is None:
        raise UnsupportedLanguageError(f"unsupported {role} language {name!r}; supported: "
                                       f"{supported_names()}")
    return lang


def other_language(language_id: str) -> Language:
    """A source language outside the supported set (chat and base models can still read
    it): named after its languageId, with a `//` comment and brace blocks assumed."""
    known = _LOOKUP.get(language_id.lower())
    if known is not None:
        return known
    name = language_id or "plain text"
    return Language(language_id, name[:1].upper() + name[1:], "", language_id, "//", True)


def suggested_file_name(uri: str, target: Language) -> str:
    """The source file's name with the target's extension (`Stack.java` -> `Stack.cs`)."""
    path = unquote(urlparse(uri).path) if re.match(r"^[a-zA-Z][\w+.-]*:", uri) else uri
    stem = PurePosixPath(path).stem if path else ""
    if not stem or stem.startswith("Untitled"):
        stem = "translation"
    return stem + target.extension


# -- splitting --------------------------------------------------------------------------

@dataclass(frozen=True)
class LineInfo:
    depth: int  # nesting depth where the line starts
    continued: bool  # the line starts inside a bracket, string or comment


def _scan_braces(text: str):
    """Walk brace-language code, skipping strings, character literals (a `'` opens one only
    when one follows, so Rust lifetimes are not) and comments. Yields (index, event, depth,
    open) where event is "line" at the start of each line (`open`: inside a string,
    comment or bracket) or "close" just after a `}` that returns to depth 0."""
    depth, parens, state, i, n = 0, 0, "", 0, len(text)
    yield 0, "line", 0, False
    while i < n:
        ch = text[i]
        if ch == "\n":
            if state in ("//", '"'):  # line comments and unescaped "..." end at a newline
                state = ""
            yield i + 1, "line", depth, bool(state) or parens > 0
        elif state == "//":
            pass
        elif state == "/*":
            if text.startswith("*/", i):
                state, i = "", i + 1
        elif state in ('"', "`"):
            if ch == "\\":
                i += 1
            elif ch == state:
                state = ""
        elif text.startswith("//", i):
            state, i = "//", i + 1
        elif text.startswith("/*", i):
            state, i = "/*", i + 1
        elif ch in '"`':
            state = ch
        elif ch == "'":
            m = re.match(r"'(\\.[^'\n]{0,8}|[^\\'\n])'", text[i:i + 12])
            if m:
                i += len(m.group(0)) - 1
        elif ch == "{":
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                yield i + 1, "close", 0, False
        elif ch in "([":
            parens += 1
        elif ch in ")]":
            parens = max(0, parens - 1)
        i += 1


def _brace_lines(text: str) -> list[LineInfo]:
    """Depth at the start of each line of brace-language code."""
    return [LineInfo(depth, is_open) for _, event, depth, is_open in _scan_braces(text)
            if event == "line"]


def _python_lines(text: str) -> list[LineInfo]:
    """Indentation level at the start of each line of Python; lines inside brackets or
    triple-quoted strings are continuations."""
    out: list[LineInfo] = []
    stack = [0]
    parens, triple = 0, ""
    for line in text.split("\n"):
        stripped = line.strip()
        continued = parens > 0 or bool(triple)
        if not continued and stripped and not stripped.startswith("#"):
            indent = len(line) - len(line.lstrip(" \t"))
            while indent < stack[-1]:
                stack.pop()
            if indent > stack[-1]:
                stack.append(indent)
        if stripped.startswith("#") and not continued:  # a comment: depth of its indent
            indent = len(line) - len(line.lstrip(" \t"))
            out.append(LineInfo(max(0, sum(1 for s in stack if s <= indent) - 1), False))
        else:
            out.append(LineInfo(len(stack) - 1, continued))
        i = 0
        while i < len(line):
            if triple:
                end = line.find(triple, i)
                if end < 0:
                    break
                triple, i = "", end + 3
                continue
            ch = line[i]
            if ch == "#":
                break
            if line.startswith(('"""', "'''"), i):
                triple, i = line[i:i + 3], i + 3
                continue
            if ch in "\"'":
                end = i + 1
                while end < len(line) and line[end] != ch:
                    end += 2 if line[end] == "\\" else 1
                i = end + 1
                continue
            if ch in "([{":
                parens += 1
            elif ch in ")]}":
                parens = max(0, parens - 1)
            i += 1
    return out


# Lines that belong to the definition below them: decorators, annotations, attributes
# (`#[derive]`, `[Test]`), comments (a `#` that is not a C preprocessor line).
_ATTACH_FORWARD = re.compile(
    r"^\s*(@|#\[|//|/\*|\*|#(?!include|define|import|pragma|if|end|el)|\[)")
_CLOSING = re.compile(r"^\s*[})\]]")
_PY_CONTINUES = re.compile(r"^\s*(else|elif|except|finally)\b")


def line_infos(text: str, language: Language) -> list[LineInfo]:
    return _brace_lines(text) if language.braces else _python_lines(text)


def split_units(text: str, language: Language, level: int = 0) -> list[str]:
    """`text` cut before each line that starts a new unit at nesting `level`: a line at
    that depth that does not continue the previous statement, does not close a block and
    is not `else:`-like. Comments, decorators and attributes right above a unit go with it.
    Joining the units gives back `text` exactly."""
    lines = text.split("\n")
    infos = line_infos(text, language)
    starts = [0]
    for i in range(1, len(lines)):
        line, info = lines[i], infos[i]
        if not line.strip() or info.continued or info.depth != level:
            continue
        if _CLOSING.match(line) or (not language.braces and _PY_CONTINUES.match(line)):
            continue
        if _ATTACH_FORWARD.match(line) and i + 1 < len(lines):
            continue  # decided by the line it belongs to
        if language.braces:
            prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            if infos[i - 1].depth > level and not prev.rstrip().endswith(("}", ";", "};")):
                continue
        j = i  # move up over comments / decorators / attributes that belong to this line
        while j - 1 > starts[-1] and lines[j - 1].strip() and \
                _ATTACH_FORWARD.match(lines[j - 1]) and infos[j - 1].depth == level:
            j -= 1
        if j > starts[-1]:
            starts.append(j)
    starts.append(len(lines))
    return ["\n".join(lines[a:b]) + ("\n" if b < len(lines) else "")
            for a, b in zip(starts, starts[1:], strict=False) if b > a]


_CONTROL = re.compile(r"^\s*[}]?\s*(if|for|foreach|while|switch|try|catch|else|do|return|"
                      r"lock|synchronized|unsafe|match|loop|defer|go|with|finally)\b")
_CLOSING_ONLY = re.compile(r"^[\s})\];,]*$")


def is_definition(unit: str, language: Language) -> bool:
    """Whether a unit is a definition with a body (function, method, class, ...) rather
    than a statement or a control block."""
    code = [ln for ln in unit.split("\n") if ln.strip() and not _ATTACH_FORWARD.match(ln)]
    if not code:
        return False
    if language.braces:
        return "{" in unit and not _CONTROL.match(code[0])
    return bool(re.match(r"\s*((async\s+)?def|class)\b", code[0])) or \
        unit.lstrip().startswith("@")


def is_closing(piece: str) -> bool:
    """Only closing brackets (the end of a class whose members were split off)."""
    return bool(piece.strip()) and all(_CLOSING_ONLY.match(ln) for ln in piece.split("\n"))


def count_blocks(text: str, language: Language) -> int:
    """Top-level definitions in `text` whose body is complete."""
    if not language.braces:
        return sum(is_definition(u, language) for u in split_units(text, language))
    return sum(event == "close" for _, event, _, _ in _scan_braces(text))


def plan_pieces(text: str, language: Language, fits, leaf: bool = False) -> list[str]:
    """Consecutive pieces of `text` (joined, they give `text` back) that each satisfy
    `fits(piece)`. Top-level units are grouped while they fit; a unit too large is split
    at the next nesting level, then at blank lines, then at lines, then at characters.
    With `leaf`, a piece holds at most one definition and no nested ones (a class is cut
    into its header, its members and its closing brace): small models learn to translate
    single functions."""
    units: list[str] = []
    for unit in split_units(text, language, 0):
        units.extend(_fitting_units(unit, language, fits, 0, leaf))
    pieces: list[str] = []
    current, current_defs = "", 0
    for unit in units:
        defs = int(is_definition(unit, language))
        closing = is_closing(unit)
        if current and (closing or is_closing(current) or not fits(current + unit) or
                        (leaf and current_defs + defs > 1) or
                        (leaf and defs and current_defs == 0 and not _only_header(current))):
            pieces.append(current)
            current, current_defs = "", 0
        current += unit
        current_defs += defs
    if current:
        pieces.append(current)
    return pieces


def _only_header(text: str) -> bool:
    """Imports, package lines and comments: kept with the definition that follows."""
    return all(not ln.strip() or _ATTACH_FORWARD.match(ln) or
               re.match(r"\s*(import|from|using|package|#include|use|extern crate)\b", ln)
               for ln in text.split("\n"))


def _nested(unit: str, language: Language, level: int) -> list[str] | None:
    """The unit split at the next level when it has nested definitions, with its closing
    lines peeled off as their own unit; None when it has none."""
    subs = split_units(unit, language, level + 1)
    if len(subs) < 2 or not any(is_definition(u, language) for u in subs[1:]):
        return None
    last = subs[-1].split("\n")
    infos = line_infos(unit, language)[-len(last):]
    k = len(last)  # the lines that close the unit itself (not its last member)
    while k > 0 and (not last[k - 1].strip() or (
            _CLOSING_ONLY.match(last[k - 1]) and infos[k - 1].depth <= level + 1)):
        k -= 1
    if 0 < k < len(last) and any(ln.strip() for ln in last[k:]):
        subs[-1:] = ["\n".join(last[:k]) + "\n", "\n".join(last[k:])]
    return subs


def _fitting_units(text: str, language: Language, fits, level: int, leaf: bool = False
                   ) -> list[str]:
    if level >= 8:
        return _split_fallback(text, fits) if not fits(text) else [text]
    if leaf:
        subs = _nested(text, language, level)
        if subs is not None:
            out: list[str] = []
            for sub in subs:
                out.extend(_fitting_units(sub, language, fits, level + 1, leaf))
            return out
    if fits(text):
        return [text]
    units = split_units(text, language, level)
    if len(units) == 1:
        if _has_deeper(text, language, level):
            return _fitting_units(text, language, fits, level + 1, leaf)
        return _split_fallback(text, fits)
    out = []
    for unit in units:
        out.extend(_fitting_units(unit, language, fits, level, leaf))
    return out


def _has_deeper(text: str, language: Language, level: int) -> bool:
    return any(info.depth > level for info in line_infos(text, language))


def _split_fallback(text: str, fits) -> list[str]:
    """Blank lines, then lines, then characters: always makes progress."""
    for sep in ("\n\n", "\n"):
        parts = [p + sep for p in text.split(sep)]
        parts[-1] = parts[-1][: -len(sep)]
        parts = [p for p in parts if p]
        if len(parts) > 1:
            out: list[str] = []
            for part in parts:
                if out and fits(out[-1] + part):
                    out[-1] += part
                elif fits(part):
                    out.append(part)
                else:
                    out.extend(_split_fallback(part, fits))
            return out
    lo, hi = 1, len(text)  # the longest fitting head
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(text[:mid]) else (lo, mid - 1)
    return [text[:lo]] + (_split_fallback(text[lo:], fits) if lo < len(text) else [])


# -- prompts ----------------------------------------------------------------------------

SYSTEM_PROMPT = ("You are a precise code translator. You translate code between "
                 "programming languages and reply with the translated code only.")


def chat_messages(code: str, source: Language, target: Language) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": (
            f"Translate the following {source.name} code to idiomatic {target.name}. "
            f"Keep the names, the behaviour and the comments. Reply with the {target.name} "
            f"code only, in one fenced code block.\n\n```{source.fence}\n{code.rstrip()}\n```")},
    ]


def chat_answer_start(target: Language) -> str:
    """Text the assistant's answer is primed with, so the code starts at once."""
    return f"```{target.fence}\n"


def tagged_prompt(code: str, source: Language, target: Language) -> str:
    """Base models without a translation format: the code under a language-tag comment,
    then the target's tag comment; the model continues in that language."""
    return (f"{source.comment} language: {source.name}\n{code.rstrip()}\n\n"
            f"{target.comment} language: {target.name}\n")


def tagged_stops(source: Language, target: Language) -> tuple[str, ...]:
    return tuple(dict.fromkeys((f"\n{target.comment} language:",
                                f"\n{source.comment} language:")))


# -- output -----------------------------------------------------------------------------

_FENCE = re.compile(r"^[ \t]*(```|~~~)[^\n]*$", re.M)
_CHATTER = re.compile(
    r"^\s*(here('s| is| are)|sure|certainly|below is|the following|this is the|"
    r"translated|translation|okay|ok,)\b[^\n]*$", re.I)
_TRAILING_CHATTER = re.compile(
    r"\n\s*\n\s*(this (code|version|translation|program|implementation)|note:|explanation|"
    r"in this|the (above|translated|code above)|key (changes|differences))\b", re.I)


def clean_output(text: str, final: bool = True) -> str:
    """The code in a model's answer: the inside of its first fenced block when it has one
    (up to where the fence closes, or all of it while it streams), else the text without
    leading chatter lines and trailing explanations."""
    m = _FENCE.search(text)
    if m is not None:
        before = text[:m.start()]
        if not before.strip() or _CHATTER.match(before.strip().split("\n")[-1]) or \
                len(before.strip().split("\n")) <= 2:
            body = text[m.end() + 1:]
            end = _FENCE.search(body)
            text = body[:end.start()] if end is not None else body
        else:  # code first, then a fence (the model started an explanation block)
            text = before
    lines = text.split("\n")
    while lines and (not lines[0].strip() or _CHATTER.match(lines[0])):
        lines.pop(0)
    text = "\n".join(lines)
    if final:
        m2 = _TRAILING_CHATTER.search(text)
        if m2 is not None:
            text = text[:m2.start()]
        text = text.rstrip() + "\n" if text.strip() else ""
    return text


def _end_of_blocks(text: str, blocks: int) -> int | None:
    """Index just past the brace that closes the `blocks`-th top-level block (and a `;`
    right after it, as in `};`); None while still open."""
    closed = 0
    for end, event, _, _ in _scan_braces(text):
        if event != "close":
            continue
        closed += 1
        if closed == blocks:
            rest = text[end:]
            stripped = rest.lstrip(" \t")
            return end + (len(rest) - len(stripped) + 1 if stripped.startswith(";") else 0)
    return None


# Longest in-line pattern looked for; one-line sources (a whole method on a line) loop
# with periods of 20-60 characters: `){Method = "x"){Method = "x"...`.
LOOP_PERIOD_MAX = 80


def looping_at(text: str) -> int | None:
    """Where a model's output starts looping, or None: a group of one to three lines (not
    just closing brackets) repeated three times in a row, or a line ending in a pattern
    repeated over its last max(48, 3 × period) characters (`+ b + b + b ...`, periods up
    to LOOP_PERIOD_MAX). The index keeps one copy."""
    lines = text.split("\n")
    complete = lines[:-1]
    starts = [0]
    for ln in complete:
        starts.append(starts[-1] + len(ln) + 1)
    body = [(i, ln.strip()) for i, ln in enumerate(complete)
            if ln.strip() and not _CLOSING_ONLY.match(ln)]
    for p in (1, 2, 3):
        if len(body) >= 3 * p:
            a, b, c = body[-p:], body[-2 * p:-p], body[-3 * p:-2 * p]
            if [x for _, x in a] == [x for _, x in b] == [x for _, x in c]:
                return starts[b[0][0]]
    last = lines[-1]
    for p in range(1, LOOP_PERIOD_MAX + 1):
        span = max(48, 3 * p)
        if len(last) < span:
            break
        tail = last[-span:]
        if tail[p:] == tail[:-p]:
            # one copy of the pattern kept after where the repetition began
            k = len(last) - span
            while k - p >= 0 and last[k - p:k] == last[k:k + p]:
                k -= p
            return len(text) - len(last) + k + p
    return None


class OutputCutter:
    """Stops a translation once it holds as many definitions as its source piece: for a
    brace language where the last one's block closes (even mid-line), for Python where
    the next top-level unit begins. What would follow is the model inventing more code."""

    def __init__(self, target: Language, definitions: int) -> None:
        self.target = target
        self.definitions = definitions

    def cut(self, text: str) -> tuple[str, bool]:
        """(the text to keep, whether the translation is complete)."""
        loop = looping_at(text)
        if loop is not None:
            return text[:loop], True
        if self.definitions < 1:
            return text, False
        if self.target.braces:
            end = _end_of_blocks(text, self.definitions)
            return (text, False) if end is None else (text[:end], True)
        units = split_units(text, self.target)
        seen = 0
        for k, unit in enumerate(units):
            seen += is_definition(unit, self.target)
            if seen == self.definitions and k + 1 < len(units):
                return "".join(units[:k + 1]), True
        return text, False
