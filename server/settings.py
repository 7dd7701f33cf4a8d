"""Server settings from `initializationOptions` and `workspace/didChangeConfiguration`.

Each field is validated on its own: a bad value is reported and that field keeps its
default (or its previous value), the rest still apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

BACKENDS = ("local",)


@dataclass(frozen=True)
class Settings:
    model_path: str | None = None  # None: the embedded default model
    backend: Any = "local"  # "local", or {"kind": "openai", "url", "model", ...}
    max_tokens: int = 64
    temperature: float = 0.0
    context_tokens: int = 1024  # prompt budget (prefix + suffix)
    languages: dict[str, bool] = field(default_factory=dict)  # languageId -> on/off
    dtype: str = "float32"
    vision_model_path: str | None = None  # a LLaVA-family checkpoint for image commands
    vision_max_tokens: int = 256
    allowed_image_roots: tuple[str, ...] = ()  # folders besides the workspace's

    def language_enabled(self, language_id: str) -> bool:
        return self.languages.get(language_id, self.languages.get("*", True))


def _positive_int(v: Any, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi:
        raise ValueError(f"expected an integer in 1..{hi}")
    return v


def _temperature(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 2:
        raise ValueError("expected a number in 0..2")
    return float(v)


def _path(v: Any) -> str | None:
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise ValueError("expected a path string")
    return v


def _choice(options: tuple[str, ...]):
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return str(v)
    return check


def _languages(v: Any) -> dict[str, bool]:
    if not isinstance(v, dict) or not all(
            isinstance(k, str) and isinstance(b, bool) for k, b in v.items()):
        raise ValueError('expected an object like {"python": true, "markdown": false}')
    return dict(v)


def _roots(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(p, str) and p for p in v):
        raise ValueError("expected a list of folder paths")
    return tuple(v)


def _backend(v: Any) -> Any:
    if v in BACKENDS:
        return v
    from .remote import RemoteConfig

    RemoteConfig.from_setting(v)  # raises ValueError with the reason
    return v


# JSON key -> (dataclass field, validator)
FIELDS = {
    "modelPath": ("model_path", _path),
    "backend": ("backend", _backend),
    "maxTokens": ("max_tokens", lambda v: _positive_int(v, 1024)),
    "temperature": ("temperature", _temperature),
    "contextTokens": ("context_tokens", lambda v: _positive_int(v, 32768)),
    "languages": ("languages", _languages),
    "dtype": ("dtype", _choice(("float32", "bfloat16", "int8"))),
    "visionModelPath": ("vision_model_path", _path),
    "visionMaxTokens": ("vision_max_tokens", lambda v: _positive_int(v, 4096)),
    "allowedImageRoots": ("allowed_image_roots", _roots),
}


def parse_settings(raw: Any, base: Settings) -> tuple[Settings, list[str]]:
    """Apply the options in `raw` (the object itself or under a "codevista" key) to `base`.

    Returns the new settings and one message per rejected or unknown field.
    """
    if raw is None:
        return base, []
    if isinstance(raw, dict) and isinstance(raw.get("codevista"), dict):
        raw = raw["codevista"]
    if not isinstance(raw, dict):
        return base, [f"codevista settings must be an object, got {type(raw).__name__}"]
    changes: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in raw.items():
        if key not in FIELDS:
            errors.append(f"unknown setting {key!r} ignored")
            continue
        name, check = FIELDS[key]
        try:
            changes[name] = check(value)
        except ValueError as e:
            errors.append(f"setting {key!r}={value!r} rejected ({e}); keeping "
                          f"{getattr(base, name)!r}")
    return replace(base, **changes), errors
