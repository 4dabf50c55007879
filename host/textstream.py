"""A request's tokens as text: released piece by piece for streaming, cut before a stop sequence.

Text that could still turn into a stop sequence is held back until it cannot, so a streamed answer never
shows part of a stop sequence; an incomplete UTF-8 character waits for its next token.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stops: list[str]) -> None:
        self._tokenizer = tokenizer
        self._stops = stops
        self.tokens: list[int] = []
        self.text = ""  # the answer so far, cut before a stop sequence once one appeared
        self.stopped = False  # a stop sequence appeared
        self._sent = 0  # characters of `text` already released

    def _decode(self) -> str:
        return str(self._tokenizer.decode(self.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def push(self, token: int) -> str:
        """Add a generated token; return the text it releases (possibly empty)."""
        self.tokens.append(token)
        full = self._decode()
        if full.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        searched_from = max(0, len(self.text) - max((len(s) for s in self._stops), default=0))
        found = [i for i in (full.find(s, searched_from) for s in self._stops) if i >= 0]
        if found:
            self.text, self.stopped = full[: min(found)], True
            return self.flush()
        self.text = full
        held = max((_overlap(full, s) for s in self._stops), default=0)
        release = full[self._sent : len(full) - held]
        self._sent = max(self._sent, len(full) - held)
        return release

    def flush(self) -> str:
        """At the end: whatever was held back."""
        release = self.text[self._sent :]
        self._sent = len(self.text)
        return release


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
