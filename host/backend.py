"""The serving backend interface: what the engine needs from a model runtime.

The engine owns the thread, the queue, batching, and which version each kernel should serve; a backend
owns the weights. Every method is called from the engine thread only. Both backends encode and decode
with the base model's Hugging Face tokenizer, so prompts are formatted exactly as in training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass
class Sequence:
    """One request being generated: the backend feeds each new token to `emit` until it returns False."""

    prompt_ids: list[int]
    max_new_tokens: int
    emit: Callable[[int], bool]


class Backend(Protocol):
    name: str
    tokenizer: Any  # the base model's Hugging Face tokenizer, set by `load`

    def load(self) -> str:
        """Load the base model (no adapter); return a name for logs."""
        ...

    def unload(self) -> None:
        """Free the base and every adapter."""
        ...

    def attach(self, kernel: str, version: int, folder: Path) -> str:
        """Serve the adapter in `folder` for `kernel`, replacing its resident version in place when it can.

        Returns how ("hot-swapped", "loaded") for the log.
        """
        ...

    def detach(self, kernel: str) -> None:
        """Drop `kernel`'s adapter; it then answers with the bare base."""
        ...

    def generate(self, kernel: str | None, sequences: list[Sequence]) -> None:
        """Generate for every sequence with `kernel`'s adapter (None: the bare base), sharing decoding steps."""
        ...
