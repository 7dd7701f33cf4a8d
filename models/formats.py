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
- Vision (the default VLM, and any LLaVA checkpoint without a chat template):
                USER: <|image|>\n{question} ASSISTANT:{answer}<|endoftext|>
  where the question of each task comes from `vision_question`.
- Vision with text read by OCR (the lines of `ocr_context`, before the question):
                USER: <|image|>\nText in the image (OCR, [x1,y1,x2,y2] 0-1000):\n
                [40,120,610,160] Traceback (most recent call last):\n...\n{question}
                ASSISTANT:{answer}<|endoftext|>
"""

from __future__ import annotations

from collections.abc import Sequence

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


VISION_TASKS = {
    "explain": ("Explain this image to a programmer. If it shows an error, say what the "
                "error means and how to fix it."),
    "describe-diagram": ("Describe this diagram: name every node, then list every edge as "
                         "`A -> B`."),
    "transcribe": ("Transcribe all the text and code in this image exactly, keeping line "
                   "breaks and indentation. Reply with the transcription only."),
    "locate": ("Locate {target} in this image. Answer with one box per match as "
               "[x1, y1, x2, y2] in 0-1000 coordinates (0,0 is the top left)."),
}


def vision_question(task: str, question: str | None) -> str:
    """The question text of a vision task (a user's own question replaces `explain`'s)."""
    if task == "locate":
        if not question or not question.strip():
            raise ValueError("the locate task needs a question naming what to find")
        return VISION_TASKS["locate"].format(target=question.strip())
    base = VISION_TASKS[task]
    if question and question.strip():
        return f"{base}\n{question.strip()}" if task != "explain" else question.strip()
    return base


OCR_HEADER = "Text in the image (OCR, [x1,y1,x2,y2] 0-1000):"


def ocr_line(text: str, box: Sequence[int]) -> str:
    """One OCR line of a vision prompt: its box (0-1000, top left is 0,0), then its text."""
    x1, y1, x2, y2 = (int(v) for v in box)
    return f"[{x1},{y1},{x2},{y2}] {' '.join(text.split())}\n"


def ocr_context(lines: Sequence[tuple[str, Sequence[int]]]) -> str:
    """The OCR block that goes between the image and the question ("" when no text was
    read, so that a prompt without OCR is exactly the plain vision prompt)."""
    if not lines:
        return ""
    return OCR_HEADER + "\n" + "".join(ocr_line(t, b) for t, b in lines)


def vision_prompt(question: str, image_token: str = IMAGE, ocr: str = "") -> str:
    """`ocr` is an `ocr_context` block (or "")."""
    return f"USER: {image_token}\n{ocr}{question} ASSISTANT:"
