"""Logging for every codevista process: stderr or a file, never stdout."""

from __future__ import annotations

import logging
import sys


def configure(level: str = "WARNING", path: str | None = None) -> None:
    handler: logging.Handler = (logging.FileHandler(path, encoding="utf-8") if path
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
