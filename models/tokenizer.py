"""Tokenizer (tokenizer.json via `tokenizers`) and incremental detokenization.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas that never
split a UTF-8 sequence: byte-level tokens that end inside a multi-byte character are
held back until the character is complete, and the deltas joined equal `decode(ids)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from .errors import ConfigError, MissingTokenizerError, TokenizerMismatchError

REPLACEMENT = "\ufffd"


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class Tokenizer:
    def __init__(self, tok: HFTokenizer, config: dict[str, Any] | None = None) -> None:
        self.tok = tok
        config = config or {}
        self.bos_token_id = self._id(_token_content(config.get("bos_token")))
        self.eos_token_id = self._id(_token_content(config.get("eos_token")))
        self.pad_token_id = self._id(_token_content(config.get("pad_token")))
        self.special_ids = frozenset(
            tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values()
            if t.special)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    @classmethod
    def from_dir(cls, directory: Path) -> Tokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise MissingTokenizerError(f"{directory} has no tokenizer.json")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception
            raise ConfigError(f"cannot read {path}: {e}") from e
        config: dict[str, Any] = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"cannot read {cfg_path}: {e}") from e
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return self.tok.get_vocab_size(with_added_tokens=True)

    def max_id(self) -> int:
        return max(self.tok.get_vocab(with_added_tokens=True).values())

    def check_against(self, model_vocab: int, stop_ids: Iterable[int]) -> None:
        """Raise TokenizerMismatchError if the tokenizer can emit ids the model lacks."""
        top = self.max_id()
        if top >= model_vocab:
            raise TokenizerMismatchError(
                f"tokenizer.json has token id {top} but config.json vocab_size is "
                f"{model_vocab}: the tokenizer does not belong to this model")
        for name, tid in (("bos", self.bos_token_id), ("eos", self.eos_token_id)):
            if tid is not None and tid >= model_vocab:
                raise TokenizerMismatchError(f"{name} token id {tid} is outside the vocabulary")
        for tid in stop_ids:
            if not 0 <= tid < model_vocab:
                raise TokenizerMismatchError(f"eos token id {tid} is outside the vocabulary "
                                             f"({model_vocab})")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def token_texts(self) -> list[str | None]:
        """Each id's text on its own (None for special tokens and for pieces of a
        multi-byte character), computed once."""
        cached = getattr(self, "_token_texts", None)
        if cached is None:
            n = self.max_id() + 1
            texts = self.tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
            cached = [None if (i in self.special_ids or not t or REPLACEMENT in t) else t
                      for i, t in enumerate(texts)]
            self._token_texts: list[str | None] = cached
        return cached

    def ids_consistent_with(self, text: str) -> list[int]:
        """Ids whose text starts with `text` or is a prefix of it (token healing)."""
        return [i for i, t in enumerate(self.token_texts())
                if t is not None and (t.startswith(text) or text.startswith(t))]


class IncrementalDetokenizer:
    """Yields text deltas for ids appended one at a time.

    Decodes a short window of recent ids (not the whole sequence) each step: the text of
    the window before and after the new id differ by the delta. A window whose text ends
    in U+FFFD is an incomplete UTF-8 sequence and waits for more ids; `flush()` releases
    whatever is left at the end, so the joined deltas always equal the full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # ids up to here have been emitted as text
        self.emitted: list[str] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        if not new_text.startswith(prefix_text):
            # A tokenizer whose decode of a window is not stable (rare): fall back to the
            # full text, which is always right.
            return self._resync()
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.emitted.append(delta)
        return delta

    def _resync(self) -> str:
        full = self._decode(self.ids)
        done = "".join(self.emitted)
        if full.endswith(REPLACEMENT) or not full.startswith(done):
            return ""
        delta = full[len(done):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.emitted.append(delta)
        return delta

    def flush(self) -> str:
        """Text not yet emitted (e.g. a genuinely invalid byte sequence at the end)."""
        full = self._decode(self.ids)
        done = "".join(self.emitted)
        if not full.startswith(done):
            return ""
        delta = full[len(done):]
        if delta:
            self.emitted.append(delta)
        self.prefix_offset = self.read_offset = len(self.ids)
        return delta

    @property
    def text(self) -> str:
        return "".join(self.emitted)
