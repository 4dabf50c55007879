from __future__ import annotations

import random

import torch

from learning.batching import bucket_batches, collate, padding_fraction
from learning.formatting import IGNORE_INDEX, Encoded


def test_collate_pads_right_with_masked_labels() -> None:
    items = [Encoded([1, 2, 3], [IGNORE_INDEX, 2, 3]), Encoded([4, 5], [IGNORE_INDEX, 5])]
    b = collate(items, [7, 9], pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b.labels.tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert b.rows == [7, 9]
    assert b.n_tokens == 5
    assert b.input_ids.dtype == torch.long


def test_buckets_cover_every_item_once_and_cut_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 200) for _ in range(64)]
    batches = bucket_batches(lengths, 8, random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(64))
    assert all(len(b) <= 8 for b in batches)
    shuffled = list(range(64))
    random.Random(2).shuffle(shuffled)
    naive = [shuffled[i : i + 8] for i in range(0, 64, 8)]
    assert padding_fraction(lengths, batches) < padding_fraction(lengths, naive) / 3


def test_bucketing_is_deterministic_per_seed() -> None:
    lengths = [5, 3, 9, 1, 7, 7, 2]
    assert bucket_batches(lengths, 2, random.Random(3)) == bucket_batches(lengths, 2, random.Random(3))
