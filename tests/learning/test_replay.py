from __future__ import annotations

import random
from collections import Counter

import pytest

from learning import replay
from learning.examples import Example


def pool(n: int, losses: list[float | None] | None = None) -> list[Example]:
    return [
        Example(id=str(i), prompt=f"p{i}", response="r", loss=None if losses is None else losses[i]) for i in range(n)
    ]


def test_replay_count_follows_ratio_and_pool() -> None:
    assert replay.replay_count(16, 0.5, 100) == 8
    assert replay.replay_count(16, 2.0, 10) == 10
    assert replay.replay_count(16, 0.0, 10) == 0


def test_uniform_is_without_replacement_and_uniform() -> None:
    items = pool(10)
    rng = random.Random(0)
    counts: Counter[str] = Counter()
    for _ in range(4000):
        got = replay.sample_replay(items, 3, "uniform", rng)
        assert len({e.id for e in got}) == 3
        counts.update(e.id for e in got)
    expected = 4000 * 3 / 10
    assert all(abs(c - expected) < 0.1 * expected for c in counts.values())


def test_reservoir_buffer_is_fixed_per_seed_and_uniform_over_seeds() -> None:
    items = pool(20)
    assert replay.reservoir_buffer(items, 5, seed=1) == replay.reservoir_buffer(items, 5, seed=1)
    assert replay.reservoir_buffer(items, 50, seed=1) == items
    counts: Counter[str] = Counter()
    for seed in range(4000):
        buf = replay.reservoir_buffer(items, 5, seed)
        assert len(buf) == 5 and len({e.id for e in buf}) == 5
        counts.update(e.id for e in buf)
    expected = 4000 * 5 / 20  # Algorithm R keeps each item with probability capacity / n
    assert all(abs(counts[str(i)] - expected) < 0.12 * expected for i in range(20))


def test_reservoir_samples_only_from_its_buffer() -> None:
    items = pool(30)
    buffer = {e.id for e in replay.reservoir_buffer(items, 6, seed=4)}
    rng = random.Random(0)
    for _ in range(50):
        got = replay.sample_replay(items, 4, "reservoir", rng, capacity=6, seed=4)
        assert {e.id for e in got} <= buffer


def test_prioritized_first_draw_is_proportional_to_loss_power() -> None:
    losses: list[float | None] = [0.1, 0.4, 1.0, 2.5]
    items = pool(4, losses)
    weights = replay.priorities(items, alpha=1.0)
    rng = random.Random(0)
    first: Counter[str] = Counter()
    n = 20000
    for _ in range(n):
        first[replay.sample_replay(items, 1, "prioritized", rng, alpha=1.0)[0].id] += 1
    total = sum(weights)
    for i, w in enumerate(weights):
        assert first[str(i)] / n == pytest.approx(w / total, abs=0.015)


def test_prioritized_is_without_replacement_and_alpha_zero_is_uniform() -> None:
    items = pool(5, [0.1, 0.2, 0.3, 0.4, 5.0])
    rng = random.Random(1)
    got = replay.sample_replay(items, 5, "prioritized", rng)
    assert sorted(e.id for e in got) == [str(i) for i in range(5)]
    assert len(set(replay.priorities(items, alpha=0.0))) == 1


def test_unmeasured_items_get_the_highest_priority() -> None:
    items = pool(3, [0.5, None, 2.0])
    p = replay.priorities(items, alpha=1.0)
    assert p[1] == p[2] > p[0]


def test_empty_inputs() -> None:
    assert replay.sample_replay([], 3, "uniform", random.Random(0)) == []
    assert replay.sample_replay(pool(3), 0, "prioritized", random.Random(0)) == []
