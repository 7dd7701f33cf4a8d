"""Prompt formats of the embedded codevista model (and its special tokens).

The training recipe and the server build prompts with these very functions, so what the
model saw in training is exactly what it gets when serving.

- Plain code:   <|lang:X|>{code}<|endoftext|>
- FIM, PSM:     <|lang:X|><|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>{middle}
                <|endoftext|>
- FIM, SPM:     <|lang:X|><|fim_suffix|>{suffix}<|fim_prefix|>{prefix}<|fim_middle|>{middle}
                <|endoftext|>
  (suffix first: while the user types at the end of the prefix, the cached K/V of
  everything before the cursor stays valid)
- Translation:  <|lang:S|>{source}<|translate|><|lang:T|>{target}<|endoftext|>
"""

from __future__ import annotations

EOT = "<|endoftext|>"
FIM_PREFIX = "<|fim_prefix|>"
FIM_MIDDLE = "<|fim_middle|>"
FIM_SUFFIX = "<|fim_suffix|>"
FIM_PAD = "<|fim_pad|>"
FILE_SEP = "<|file_sep|>"
TRANSLATE = "<|translate|>"
IMAGE = "<|image|>"

# Language ids as editors name them (LSP languageId), in the order of their tag tokens.
LANGUAGES = ("python", "java", "csharp", "c", "cpp", "javascript", "typescript", "go", "rust")


def lang_tag(language: str) -> str:
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    return f"<|lang:{language}|>"


SPECIAL_TOKENS = [EOT, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, FILE_SEP, TRANSLATE, IMAGE,
                  *(lang_tag(lang) for lang in LANGUAGES)]


def plain(language: str, code: str) -> str:
    """A whole file (training) or the text before the cursor (serving, without EOT)."""
    return lang_tag(language) + code


def fim_psm(language: str, prefix: str, suffix: str) -> str:
    """Prefix-suffix-middle prompt; the model writes the middle, then EOT."""
    return f"{lang_tag(language)}{FIM_PREFIX}{prefix}{FIM_SUFFIX}{suffix}{FIM_MIDDLE}"


def fim_spm(language: str, prefix: str, suffix: str) -> str:
    """Suffix-prefix-middle prompt; the model writes the middle, then EOT."""
    return f"{lang_tag(language)}{FIM_SUFFIX}{suffix}{FIM_PREFIX}{prefix}{FIM_MIDDLE}"


def translation(source_language: str, source: str, target_language: str) -> str:
    """Translation prompt; the model writes the target code, then EOT."""
    return f"{lang_tag(source_language)}{source}{TRANSLATE}{lang_tag(target_language)}"
