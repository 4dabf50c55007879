"""Dynamic padding and length bucketing: batches of similar length, so almost no compute goes to padding."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from learning.formatting import IGNORE_INDEX, Encoded


@dataclass
class Batch:
    """Right-padded tensors for one training step; `rows` are the items' indices in the caller's table."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    rows: list[int]

    def to(self, device: torch.device) -> Batch:
        """The same batch with its tensors on `device` (collate builds them on the CPU)."""
        return Batch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            labels=self.labels.to(device),
            rows=self.rows,
        )

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int(self.attention_mask.sum())


def collate(items: Sequence[Encoded], rows: Sequence[int], pad_id: int) -> Batch:
    """Pad on the right to the longest item; right padding keeps position ids equal to token indices.

    The tensors are on the CPU; `Batch.to` moves them to the model's device.
    """
    width = max(len(e) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return Batch(input_ids=ids, attention_mask=mask, labels=labels, rows=list(rows))


def bucket_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Group indices into batches of similar length, then shuffle the batch order.

    Indices are shuffled before a stable sort so equal-length items land in random batches.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded tensor area that is padding."""
    area = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    real = sum(lengths[i] for b in batches for i in b)
    return 0.0 if area == 0 else 1.0 - real / area
