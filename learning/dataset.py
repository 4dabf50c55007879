"""A run's training data, built once up front: every item encoded, every KL target computed.

The table holds, in order: the new items; the replay set (earlier facts chosen once for the whole
run, see learning/replay.py); neighbour anchors (each new prompt with its novel words removed,
answered by the base, see learning/neighbours.py); the anchors nearest to the new items (kept in
every epoch: general knowledge that looks like what is taught is what is most at risk); the
must-keep facts with the answers the replaced version gave (every epoch too); the other
anchors (a fresh uniform sample each epoch). An epoch is a list of batches of table indices, a pure
function of the table, the epoch number and the seed, so a resumed run replays the same batches.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from learning import interrupt, replay
from learning.anchors import Anchor
from learning.batching import bucket_batches
from learning.config import TrainSettings
from learning.examples import Example
from learning.formatting import Encoded, encode_example
from learning.fsutil import atomic_path
from learning.losses import hidden_states, selected_logits, topk_logprobs
from learning.model_loading import model_device
from learning.neighbours import neighbour_anchors
from learning.similarity import nearest_first, prompt_embeddings

log = logging.getLogger(__name__)

ItemKind = Literal["new", "replay", "neighbour", "anchor"]
KlTargets = tuple[torch.Tensor, torch.Tensor]  # the base's top-k (ids, logprobs) per position, on the CPU


@dataclass(frozen=True)
class TrainItem:
    id: str
    kind: ItemKind
    encoded: Encoded
    kl: KlTargets | None = None


@dataclass(frozen=True)
class RunData:
    """The item table and which rows each epoch takes."""

    items: list[TrainItem]
    every_epoch: list[int]  # new, replay, neighbours, nearest anchors, rehearsed must-keep facts
    sampled: list[int]  # the other anchors
    per_epoch_sampled: int
    replayed: list[str]  # ids of the earlier facts in the replay set

    @property
    def new(self) -> list[int]:
        return [i for i, it in enumerate(self.items) if it.kind == "new"]

    @property
    def epoch_size(self) -> int:
        return len(self.every_epoch) + self.per_epoch_sampled

    def batches_per_epoch(self, batch_size: int) -> int:
        return math.ceil(self.epoch_size / batch_size)

    def epoch(self, epoch: int, batch_size: int, seed: int) -> list[list[int]]:
        """The epoch's batches of table indices, grouped by length."""
        rng = random.Random(f"{seed}:{epoch}")
        rows = self.every_epoch + rng.sample(self.sampled, self.per_epoch_sampled)
        lengths = [len(self.items[i].encoded) for i in rows]
        return [[rows[j] for j in batch] for batch in bucket_batches(lengths, batch_size, rng)]


def build(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    new: Sequence[Example],
    earlier: Sequence[Example],
    anchors: Sequence[Anchor],
    settings: TrainSettings,
    kl_cache_dir: Path | None = None,
    near_anchors: Sequence[int] | None = None,
    rehearsed: Sequence[Anchor] = (),
) -> RunData:
    """Choose the replay set and the anchors, encode everything, and compute the base's KL targets.

    `near_anchors` is the anchors' order by closeness to the new items, when the caller has it already;
    `rehearsed` are anchors every epoch takes (the must-keep facts).
    """
    s = settings
    with_kl = s.kl_weight > 0
    need_embeddings = s.replay_strategy == "nearest" or (
        anchors and s.anchor_neighbour_share > 0 and near_anchors is None
    )
    new_emb = prompt_embeddings(model, tokenizer, [e.prompt for e in new]) if need_embeddings else None

    k_replay = replay.replay_count(len(new), s.replay_ratio, len(earlier))
    nearest = None
    if s.replay_strategy == "nearest" and k_replay and new_emb is not None:
        nearest = nearest_first(new_emb, prompt_embeddings(model, tokenizer, [e.prompt for e in earlier]))
    chosen = replay.sample_replay(
        earlier,
        k_replay,
        s.replay_strategy,
        random.Random(f"{s.seed}:replay"),
        alpha=s.replay_alpha,
        capacity=s.replay_buffer_size,
        seed=s.seed,
        nearest=nearest,
    )

    use_neighbours = s.neighbour_anchors and (s.anchor_ratio > 0 or with_kl)
    neighbours = neighbour_anchors(model, tokenizer, new) if use_neighbours else []

    k_anchor = min(len(anchors), round(s.anchor_ratio * len(new)))
    near: list[int] = []
    if k_anchor and s.anchor_neighbour_share > 0:
        if near_anchors is None:
            assert new_emb is not None
            near_anchors = nearest_anchor_order(model, tokenizer, new, anchors, new_emb)
        near = list(near_anchors)[: round(s.anchor_neighbour_share * k_anchor)]
    others = [i for i in range(len(anchors)) if i not in set(near)] if k_anchor else []

    def encode(e: Example, *, eos: bool = True) -> Encoded:
        return encode_example(tokenizer, e, s.max_seq_len, end_with_eos=eos)

    def anchor_item(a: Anchor, kind: ItemKind) -> TrainItem:
        interrupt.check()  # its KL targets can mean a base forward pass
        enc = encode(a.example, eos=a.finished)
        return TrainItem(a.example.id, kind, enc, base_topk(model, enc, s.kl_top_k, kl_cache_dir) if with_kl else None)

    items = [TrainItem(e.id, "new", encode(e)) for e in new]
    items += [TrainItem(e.id, "replay", encode(e)) for e in chosen]
    items += [anchor_item(a, "neighbour") for a in neighbours]
    items += [anchor_item(anchors[i], "anchor") for i in near]
    items += [anchor_item(a, "anchor") for a in rehearsed]
    every_epoch = list(range(len(items)))
    items += [anchor_item(anchors[i], "anchor") for i in others]
    return RunData(
        items=items,
        every_epoch=every_epoch,
        sampled=list(range(len(every_epoch), len(items))),
        per_epoch_sampled=min(k_anchor - len(near), len(others)) if k_anchor else 0,
        replayed=[e.id for e in chosen],
    )


def nearest_anchor_order(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    new: Sequence[Example],
    anchors: Sequence[Anchor],
    new_emb: torch.Tensor | None = None,
) -> list[int]:
    """Anchor indices, nearest to the new items first (round-robin over the new items)."""
    if new_emb is None:
        new_emb = prompt_embeddings(model, tokenizer, [e.prompt for e in new])
    return nearest_first(new_emb, prompt_embeddings(model, tokenizer, [a.example.prompt for a in anchors]))


def base_topk(model: PeftModel, enc: Encoded, k: int, cache_dir: Path | None) -> KlTargets:
    """The base model's top-k next-token distribution at every position, cached on disk when allowed."""
    if cache_dir is None:
        return _base_topk(model, enc, k)
    digest = hashlib.sha256(f"{k}:{enc.input_ids}".encode()).hexdigest()[:24]
    path = cache_dir / f"{digest}.safetensors"
    if path.is_file():
        try:
            cached = load_file(str(path))
            return cached["ids"], cached["logprobs"]
        except (OSError, RuntimeError, KeyError):
            log.warning("recomputing unreadable KL targets %s", path)
    ids, logprobs = _base_topk(model, enc, k)
    with atomic_path(path) as tmp:
        save_file({"ids": ids.contiguous(), "logprobs": logprobs.contiguous()}, str(tmp))
    return ids, logprobs


@torch.no_grad()
def _base_topk(model: PeftModel, enc: Encoded, k: int) -> KlTargets:
    """One sequence at a time (no padding), so the numbers never depend on batch composition."""
    device = model_device(model)
    ids = torch.tensor([enc.input_ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            hidden = hidden_states(model, ids, torch.ones_like(ids))
            select = torch.ones(1, ids.shape[1] - 1, dtype=torch.bool, device=device)
            logits = selected_logits(model, hidden, select)
    finally:
        model.train(was_training)
    top_ids, top_logprobs = topk_logprobs(logits, k)
    return top_ids.cpu(), top_logprobs.cpu()
