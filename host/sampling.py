"""Choosing the next token from one row of logits: greedy, or temperature and nucleus (top-p) sampling.

Plain functions over numpy arrays, shared by both backends, so a seed means the same thing on either.
Each request gets its own generator: a seeded request repeats its sample whatever it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def make_rng(sampling: Sampling) -> np.random.Generator | None:
    """The request's own random stream (None when greedy); any 64-bit seed, negative ones included."""
    if sampling.greedy:
        return None
    seed = None if sampling.seed is None else sampling.seed % 2**64
    return np.random.Generator(np.random.PCG64(seed))


def probabilities(logits: np.ndarray, temperature: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, their probabilities) after temperature and top-p; the ids in descending probability
    when top-p cuts, else all of them in vocabulary order."""
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if top_p >= 1.0:
        return np.arange(p.size), p
    order = np.argsort(-p, kind="stable")
    sorted_p = p[order]
    # The smallest prefix whose mass reaches top_p (always at least the most likely token).
    keep = int(np.searchsorted(np.cumsum(sorted_p), top_p)) + 1
    kept = sorted_p[:keep]
    return order[:keep], kept / kept.sum()


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None) -> int:
    """The next token for one row of logits (vocabulary-sized, any float dtype)."""
    if sampling.greedy or rng is None:
        return int(np.argmax(logits))
    ids, p = probabilities(logits, sampling.temperature, sampling.top_p)
    index = int(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), side="right"))
    return int(ids[min(index, ids.size - 1)])
