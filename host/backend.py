"""The serving backend interface: what the engine needs from a model runtime.

The engine owns the thread, the queue, batching, text and stop sequences, and which version each kernel
should serve; a backend owns the weights and the decoding steps. Every method is called from the engine
thread only. Both backends encode and decode with the base model's Hugging Face tokenizer, so prompts are
formatted exactly as in training, and both choose tokens with `host.sampling.pick`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from host.sampling import GREEDY, Sampling, make_rng


@dataclass
class Sequence:
    """One request being generated: the backend feeds each new token to `emit` until it returns False
    (end of sequence, token budget, stop sequence, or the client went away)."""

    prompt_ids: list[int]
    max_new_tokens: int
    emit: Callable[[int], bool]
    sampling: Sampling = GREEDY
    rng: np.random.Generator | None = field(init=False)

    def __post_init__(self) -> None:
        self.rng = make_rng(self.sampling)


# Returns sequences for the same kernel that arrived while a batch runs; a backend that can add sequences
# between decoding steps (continuous batching) calls it after each step, others never do.
Admit = Callable[[], list[Sequence]]


class Backend(Protocol):
    name: str
    tokenizer: Any  # the base model's Hugging Face tokenizer, set by `load`
    context_length: int  # the longest prompt plus answer one sequence can hold, set by `load`

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

    def generate(self, kernel: str | None, sequences: list[Sequence], admit: Admit) -> None:
        """Generate for every sequence with `kernel`'s adapter (None: the bare base), sharing decoding steps."""
        ...
