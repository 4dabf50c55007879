"""How the dashboard and the terminal write a few values, so the two read the same."""

from __future__ import annotations


def duration(seconds: float | None, missing: str = "-") -> str:
    """'42 s', '7.5 min' or '2.1 h'."""
    if seconds is None:
        return missing
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def count(n: int, noun: str) -> str:
    """'1 item', '2 items'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
