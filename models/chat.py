"""Chat templates of instruct checkpoints, rendered with Jinja2 in a sandbox.

An instruct checkpoint says how a conversation becomes text in its `chat_template`: a
Jinja2 template stored in `tokenizer_config.json` (a string, or a list of named templates),
in `chat_template.jinja`, or in `chat_template.json`. It is rendered the way the checkpoint's
authors render it: Jinja2 with `trim_blocks` and `lstrip_blocks`, the `loopcontrols`
extension, a `tojson` filter and a `raise_exception` function. The environment is
Jinja2's immutable sandbox, since a template comes with a downloaded checkpoint and is
untrusted input.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import ConfigError


class TemplateError(ConfigError):
    """A chat template that does not parse or that raised while rendering."""


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<|im_end|>", "lstrip": false, ...}
        return str(value.get("content", ""))
    return value if isinstance(value, str) else ""


def _environment():  # -> jinja2 sandbox environment
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"the chat template refused the conversation: {message}")

    def tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
               sort_keys: bool = False) -> str:
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    @classmethod
    def from_dir(cls, directory: Path) -> ChatTemplate | None:
        """The checkpoint's default chat template, or None if it has none (a base model)."""
        cfg: dict[str, Any] = {}
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError(f"{cfg_path}: not valid JSON ({e})") from e
        source = cfg.get("chat_template")
        if isinstance(source, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        if not source and (directory / "chat_template.jinja").is_file():
            source = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if not source and (directory / "chat_template.json").is_file():
            try:
                source = json.loads((directory / "chat_template.json").read_text(
                    encoding="utf-8")).get("chat_template")
            except (OSError, ValueError, AttributeError) as e:
                raise ConfigError(f"{directory / 'chat_template.json'}: {e}") from e
        if not isinstance(source, str) or not source.strip():
            return None
        template = cls(source, _token_text(cfg.get("bos_token")),
                       _token_text(cfg.get("eos_token")))
        template._compiled()  # a broken template is reported when the model loads
        return template

    def _compiled(self):
        import jinja2

        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template does not parse: {e}") from e

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True
               ) -> str:
        import jinja2

        try:
            return self._compiled().render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed to render: {e}") from e
