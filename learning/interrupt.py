"""A process-wide stop request, checked at the batch boundaries of every long loop in `learning/`.

The worker sets it from its SIGTERM handler or when a run is cancelled (`request`); generation,
perplexity, the Fisher pass, the baseline and evaluation call `check()` between batches, which raises
`StopRequested`, so a stop lands within one batch in every phase. Training itself stops through its
`should_stop` callback, which writes a checkpoint first. Nothing here imports torch.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_reason: str | None = None


class StopRequested(Exception):
    """A stop was requested (SIGTERM, a cancel, the e-stop); the message says which."""


def request(reason: str) -> None:
    """Ask every loop to stop at its next check; the first reason given is kept."""
    global _reason
    with _lock:
        if _reason is None:
            _reason = reason


def clear() -> None:
    global _reason
    with _lock:
        _reason = None


def requested() -> str | None:
    """The pending stop's reason, or None."""
    return _reason


def check() -> None:
    """Raise `StopRequested` when a stop was requested; call it between batches."""
    reason = _reason
    if reason is not None:
        raise StopRequested(reason)
