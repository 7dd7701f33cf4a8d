"""Completion prompts: the FIM template of the model's family, within a token budget.

The family is read from the tokenizer's special tokens (what the checkpoint was trained
with), never from a file name. The prefix window starts at a line boundary snapped to a
multiple of ANCHOR_LINES, so while the user types the prompt's beginning stays put and
the engine's prefix cache serves nearly all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from codevista.models import formats
from codevista.models.tokenizer import Tokenizer

from .documents import Snapshot

ANCHOR_LINES = 8
CHARS_PER_TOKEN = 3.0  # first guess, then checked with the tokenizer

# Editor languageId -> the embedded model's language tag (None: no tag).
LANGUAGE_TAGS = {lang: lang for lang in formats.LANGUAGES} | {
    "javascriptreact": "javascript", "typescriptreact": "typescript", "c++": "cpp",
    "cs": "csharp", "golang": "go", "py": "python"}


@dataclass(frozen=True)
class Family:
    name: str
    suffix_first: bool  # SPM: the cached prefix survives typing

    def render(self, language_id: str, prefix: str, suffix: str, path: str) -> str:
        if self.name == "codevista":
            tag = LANGUAGE_TAGS.get(language_id)
            if tag is None:  # an unknown language: no tag, plain FIM markers
                return (f"{formats.FIM_SUFFIX}{suffix}{formats.FIM_PREFIX}{prefix}"
                        f"{formats.FIM_MIDDLE}")
            return formats.fim_spm(tag, prefix, suffix)
        if self.name == "qwen":
            return f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
        if self.name == "starcoder":
            return f"<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
        if self.name == "deepseek":
            return f"<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>"
        if self.name == "codegeex4":
            return (f"<|user|>\n###PATH:{path}\n###LANGUAGE:{language_id}\n###MODE:BLOCK\n"
                    f"<|code_suffix|>{suffix}<|code_prefix|>{prefix}<|code_middle|>"
                    f"<|assistant|>\n")
        return prefix  # a base model without FIM: plain left-to-right

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        return {"qwen": ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>"),
                "starcoder": ("<|endoftext|>", "<file_sep>"),
                "deepseek": ("<｜end▁of▁sentence｜>",),
                "codegeex4": ("<|endoftext|>", "<|user|>", "<|observation|>"),
                "codevista": (formats.EOT,)}.get(self.name, ())


def detect_family(tok: Tokenizer) -> Family:
    has = tok.token_to_id
    if has(formats.lang_tag("python")) is not None and has(formats.FIM_MIDDLE) is not None:
        return Family("codevista", suffix_first=True)
    if has("<|code_middle|>") is not None:
        return Family("codegeex4", suffix_first=True)
    if has("<|fim_middle|>") is not None:
        return Family("qwen", suffix_first=False)
    if has("<fim_middle>") is not None:
        return Family("starcoder", suffix_first=False)
    if has("<｜fim▁hole｜>") is not None:
        return Family("deepseek", suffix_first=False)
    return Family("plain", suffix_first=False)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    prefix_chars: int  # characters of the document before the cursor in the prompt
    suffix_chars: int


def _first_line(lines: list[str], max_chars: int) -> int:
    """First line of a window of at most ~max_chars ending at the cursor, snapped up to
    the anchor grid so that it does not move while the user types."""
    total = 0
    for i in range(len(lines) - 1, -1, -1):
        total += len(lines[i]) + 1
        if total > max_chars:
            return min(len(lines) - 1, -(-(i + 1) // ANCHOR_LINES) * ANCHOR_LINES)
    return 0


def build_prompt(family: Family, tok: Tokenizer, snap: Snapshot, budget: int,
                 path: str = "") -> Prompt:
    suffix_budget = budget // 4 if family.name != "plain" else 0
    suffix = snap.suffix
    if suffix_budget:
        limit = int(suffix_budget * CHARS_PER_TOKEN)
        if len(suffix) > limit:
            cut = suffix.rfind("\n", 0, limit)
            suffix = suffix[:cut + 1 if cut > 0 else limit]
    else:
        suffix = ""
    lines = snap.prefix.split("\n")
    first = _first_line(lines, int((budget - suffix_budget) * CHARS_PER_TOKEN))
    while True:
        prefix = "\n".join(lines[first:])
        ids = tok.encode(family.render(snap.language_id, prefix, suffix, path),
                         add_special_tokens=False)
        if len(ids) <= budget:
            return Prompt(ids=ids, prefix_chars=len(prefix), suffix_chars=len(suffix))
        if first < len(lines) - 1:
            first = min(len(lines) - 1, (first // ANCHOR_LINES + 1) * ANCHOR_LINES)
        elif suffix:
            suffix = suffix[: len(suffix) // 2]  # one huge line: shrink the suffix first
        else:
            lines[-1] = lines[-1][len(lines[-1]) // 4:]  # then the line itself
