"""Log a recurring problem once, not every poll, and again only after it went away and came back."""

from __future__ import annotations

import logging


class LogOnce:
    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: dict[str, str] = {}

    def problem(self, key: str, message: str, *, exc_info: bool = False) -> None:
        if self._seen.get(key) != message:
            self._seen[key] = message
            self._log.error("%s", message, exc_info=exc_info)

    def clear(self, key: str) -> None:
        self._seen.pop(key, None)
