"""Which earlier facts a run rehearses: pure functions of the pool, a count and a seeded RNG.

A run picks its replay set once, up front, and keeps it for every epoch: at most `replay_ratio` times
as many earlier facts as new ones. Every earlier fact not in that set is held back, and the retention
gate (learning/metrics.py) checks all of them, replayed or not. `nearest` is interference-aware: it
rehearses the earlier facts whose questions read most like the new ones (the same question form, a
similar subject), which are the ones a new fact is most likely to overwrite.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from learning.config import ReplayStrategy
from learning.examples import Example


def replay_count(n_new: int, ratio: float, pool_size: int) -> int:
    """How many replay items go with `n_new` new items: `round(ratio * n_new)`, capped by the pool."""
    return min(pool_size, round(ratio * n_new))


def uniform(pool: Sequence[Example], k: int, rng: random.Random) -> list[Example]:
    """k distinct items, each equally likely."""
    return rng.sample(list(pool), min(k, len(pool)))


def reservoir_buffer(pool: Sequence[Example], capacity: int, seed: int) -> list[Example]:
    """Algorithm R over the pool in order: a fixed, uniformly drawn buffer of at most `capacity` items."""
    rng = random.Random(seed)
    buffer: list[Example] = []
    for i, item in enumerate(pool):
        if i < capacity:
            buffer.append(item)
        else:
            j = rng.randint(0, i)
            if j < capacity:
                buffer[j] = item
    return buffer


def reservoir(pool: Sequence[Example], k: int, rng: random.Random, capacity: int, seed: int) -> list[Example]:
    """k distinct items drawn uniformly from the seeded reservoir buffer of the pool."""
    return uniform(reservoir_buffer(pool, capacity, seed), k, rng)


def priorities(pool: Sequence[Example], alpha: float, eps: float = 1e-3) -> list[float]:
    """(loss + eps)^alpha; items never measured get the pool's highest loss, as new PER transitions do."""
    known = [e.loss for e in pool if e.loss is not None]
    top = max(known) if known else 1.0
    return [((top if e.loss is None else e.loss) + eps) ** alpha for e in pool]


def prioritized(pool: Sequence[Example], k: int, rng: random.Random, alpha: float) -> list[Example]:
    """k distinct items, drawn successively with probability ∝ loss^alpha (Efraimidis-Spirakis keys)."""
    weights = priorities(pool, alpha)
    # key = u^(1/w); the k largest keys are a weighted sample without replacement. log form avoids underflow.
    keys = [math.log(1.0 - rng.random()) / w for w in weights]
    order = sorted(range(len(pool)), key=lambda i: keys[i], reverse=True)
    return [pool[i] for i in order[: min(k, len(pool))]]


def sample_replay(
    pool: Sequence[Example],
    k: int,
    strategy: ReplayStrategy,
    rng: random.Random,
    *,
    alpha: float = 0.6,
    capacity: int = 512,
    seed: int = 0,
    nearest: Sequence[int] | None = None,
) -> list[Example]:
    """Dispatch to the strategy's sampler; `nearest` is the pool's order by closeness to the new items."""
    if k <= 0 or not pool:
        return []
    if strategy == "nearest":
        if nearest is None:
            raise ValueError("nearest replay needs the pool ordered by closeness to the new items")
        return [pool[i] for i in list(nearest)[:k]]
    if strategy == "uniform":
        return uniform(pool, k, rng)
    if strategy == "reservoir":
        return reservoir(pool, k, rng, capacity, seed)
    return prioritized(pool, k, rng, alpha)
