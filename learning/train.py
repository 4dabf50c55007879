"""The training loop: new items + replay + anchors per epoch, LoRA only, plain PyTorch.

One call trains one run. Each epoch holds every new item, a replay sample of earlier items and a
sample of anchor items (the base model's own answers), bucketed by length into batches. The loss is
the per-item mean cross-entropy over response tokens, plus optional KL to the base model on anchor
sequences and an optional EWC penalty. After each epoch a cheap teacher-forced check tells whether
every new item is reproduced exactly (greedy decoding would then return the whole response), which
drives early stopping. A checkpoint with the full state is written every `checkpoint_every` steps
and when `should_stop()` turns true; a later call with the same inputs and checkpoint directory
resumes from the newest one and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from learning import checkpoint, ewc, interrupt, lora, replay
from learning.anchors import Anchor
from learning.batching import Batch, bucket_batches, collate
from learning.config import TrainSettings
from learning.examples import Example
from learning.formatting import Encoded, encode_example
from learning.losses import (
    decoder_and_head,
    hidden_states,
    per_row_mean,
    selected_logits,
    target_mask,
    token_ce,
    topk_kl,
    topk_logprobs,
)
from learning.model_loading import model_device
from learning.neighbours import neighbour_anchors
from learning.reports import Phase, Progress, StopReason, TrainOutcome

log = logging.getLogger(__name__)

ItemKind = Literal["new", "replay", "anchor"]


@dataclass
class EwcTerm:
    """The previous version's parameters and (normalised) Fisher, and the penalty weight."""

    anchor: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]
    weight: float


@dataclass
class _Item:
    id: str
    kind: ItemKind
    encoded: Encoded
    kl: tuple[torch.Tensor, torch.Tensor] | None = None  # base top-k (ids, logprobs) per position, on the CPU


@dataclass
class _State:
    """Everything that changes during a run and must survive a restart."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    plan: list[list[str]] = field(default_factory=list)
    passes: int = 0
    new_em: float | None = None
    last_loss: float | None = None
    example_losses: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0


def lr_lambda(settings: TrainSettings, total_steps: int) -> Callable[[int], float]:
    """Linear warmup to the peak, then cosine decay to `min_lr_ratio` of it at `total_steps`."""

    def factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / (settings.warmup_steps + 1)
        span = max(total_steps - settings.warmup_steps, 1)
        progress = min((step - settings.warmup_steps) / span, 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * cosine

    return factor


def make_optimizer(params: Sequence[torch.nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW with the fused kernel (one pass over all adapter tensors per step, on the CPU or a GPU)."""
    return torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.999), fused=True
    )


def run_fingerprint(
    settings: TrainSettings, new: Sequence[Example], pool: Sequence[Example], anchors: Sequence[Anchor]
) -> str:
    """Identifies a run's inputs, so a checkpoint is only resumed by the run that wrote it."""
    h = hashlib.sha256(settings.model_dump_json().encode())
    for e in [*new, *pool, *(a.example for a in anchors)]:
        h.update(e.model_dump_json(exclude={"loss"}).encode())
    h.update(json.dumps([e.loss for e in pool]).encode())
    return h.hexdigest()[:16]


class _Run:
    """Holds a run's data tables and the bits of the loop that need them."""

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        new: Sequence[Example],
        pool: Sequence[Example],
        anchors: Sequence[Anchor],
        settings: TrainSettings,
        kl_cache_dir: Path | None = None,
    ) -> None:
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.device = model_device(model)
        self.kl_cache_dir = kl_cache_dir
        self.new, self.pool, self.anchors = list(new), list(pool), list(anchors)
        self.items: dict[str, _Item] = {}
        self._near: list[int] | None = None
        self._neighbours: list[Anchor] | None = None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id: int = int(pad)
        n_new = len(self.new)
        self.k_replay = replay.replay_count(n_new, settings.replay_ratio, len(self.pool))
        self.k_anchor = min(len(self.anchors), round(settings.anchor_ratio * n_new))

    def item(self, key: str) -> _Item:
        """Encode on first use; keys are 'new:<i>', 'replay:<i>', 'anchor:<i>', 'neighbour:<i>' (list indices)."""
        if key in self.items:
            return self.items[key]
        interrupt.check()  # encoding an anchor can mean a base forward pass (KL targets)
        kind, _, ref = key.partition(":")
        if kind in ("anchor", "neighbour"):
            anchor = self.anchors[int(ref)] if kind == "anchor" else self.neighbours()[int(ref)]
            enc = encode_example(
                self.tokenizer, anchor.example, self.settings.max_seq_len, end_with_eos=anchor.finished
            )
            it = _Item(id=anchor.example.id, kind="anchor", encoded=enc)
            if self.settings.kl_weight > 0:
                it.kl = self.base_topk(enc)
        else:
            source = self.new if kind == "new" else self.pool
            example = source[int(ref)]
            it = _Item(
                id=example.id,
                kind="new" if kind == "new" else "replay",
                encoded=encode_example(self.tokenizer, example, self.settings.max_seq_len),
            )
        self.items[key] = it
        return it

    def base_topk(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """The base model's top-k next-token distribution at every position, cached on disk when allowed."""
        k = self.settings.kl_top_k
        if self.kl_cache_dir is None:
            return self._base_topk(enc, k)
        digest = hashlib.sha256(f"{k}:{enc.input_ids}".encode()).hexdigest()[:24]
        path = self.kl_cache_dir / f"{digest}.safetensors"
        if path.is_file():
            try:
                cached = load_file(str(path))
                return cached["ids"], cached["logprobs"]
            except (OSError, RuntimeError, KeyError):
                log.warning("recomputing unreadable KL targets %s", path)
        ids, logprobs = self._base_topk(enc, k)
        self.kl_cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file({"ids": ids.contiguous(), "logprobs": logprobs.contiguous()}, str(tmp))
        tmp.replace(path)
        return ids, logprobs

    @torch.no_grad()
    def _base_topk(self, enc: Encoded, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Computed one sequence at a time (no padding) so the numbers never depend on batch composition,
        which keeps a resumed run identical to an uninterrupted one.
        """
        ids = torch.tensor([enc.input_ids], device=self.device)
        mask = torch.ones_like(ids)
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                hidden = hidden_states(self.model, ids, mask)
                select = torch.ones(1, ids.shape[1] - 1, dtype=torch.bool, device=self.device)
                logits = selected_logits(self.model, hidden, select)
        finally:
            self.model.train(was_training)
        top_ids, top_logprobs = topk_logprobs(logits, k)
        return top_ids.cpu(), top_logprobs.cpu()  # kept with the items for the whole run: off the GPU

    def plan_epoch(self, epoch: int) -> list[list[str]]:
        """The epoch's batches as item keys: all new items and their neighbours, a replay and an anchor sample."""
        s = self.settings
        rng = random.Random(f"{s.seed}:{epoch}")
        keys = [f"new:{i}" for i in range(len(self.new))]
        if self.k_replay:
            index = {id(e): i for i, e in enumerate(self.pool)}
            chosen = replay.sample_replay(
                self.pool,
                self.k_replay,
                s.replay_strategy,
                rng,
                alpha=s.replay_alpha,
                capacity=s.replay_buffer_size,
                seed=s.seed,
            )
            keys += [f"replay:{index[id(e)]}" for e in chosen]
        keys += [f"neighbour:{i}" for i in range(len(self.neighbours()))]
        if self.k_anchor:
            near = self.near_anchors()[: round(s.anchor_neighbour_share * self.k_anchor)]
            rest = [i for i in range(len(self.anchors)) if i not in set(near)]
            picked = near + rng.sample(rest, self.k_anchor - len(near))
            keys += [f"anchor:{i}" for i in picked]
        lengths = [len(self.item(k).encoded) for k in keys]
        return [[keys[i] for i in b] for b in bucket_batches(lengths, s.batch_size, rng)]

    @property
    def batches_per_epoch(self) -> int:
        items = len(self.new) + self.k_replay + self.k_anchor + len(self.neighbours())
        return math.ceil(items / self.settings.batch_size)

    def neighbours(self) -> list[Anchor]:
        """The new prompts with their novel words removed, answered by the base (see learning.neighbours)."""
        if self._neighbours is None:
            use = self.settings.neighbour_anchors and (self.settings.anchor_ratio > 0 or self.settings.kl_weight > 0)
            self._neighbours = neighbour_anchors(self.model, self.tokenizer, self.new) if use else []
        return self._neighbours

    def near_anchors(self) -> list[int]:
        """Anchor indices, nearest to the new items first, taken round-robin over the new items.

        The general knowledge most at risk is the kind that looks like what is being taught (a made-up
        "capital of X" disturbs real capitals), so those anchors are kept in every epoch.
        """
        if self._near is None:
            new = prompt_embeddings(self.model, self.tokenizer, [e.prompt for e in self.new])
            anchors = prompt_embeddings(self.model, self.tokenizer, [a.example.prompt for a in self.anchors])
            rankings = (new @ anchors.T).argsort(dim=1, descending=True).tolist()
            order: list[int] = []
            seen: set[int] = set()
            for depth in range(len(self.anchors)):
                for ranking in rankings:
                    if ranking[depth] not in seen:
                        seen.add(ranking[depth])
                        order.append(ranking[depth])
            self._near = order
        return self._near

    def batch(self, keys: Sequence[str]) -> tuple[Batch, list[_Item]]:
        """The items' batch, on the model's device."""
        items = [self.item(k) for k in keys]
        return collate([it.encoded for it in items], range(len(items)), self.pad_id).to(self.device), items

    def losses(self, batch: Batch, items: Sequence[_Item]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-row mean response CE [B], and the mean KL to the base over anchor rows (None without KL)."""
        n = len(items)
        ce_mask = target_mask(batch.labels)
        kl_mask = torch.zeros_like(ce_mask)
        kl_rows = [r for r, it in enumerate(items) if it.kl is not None]
        for r in kl_rows:
            kl_mask[r, : len(items[r].encoded) - 1] = True
        select = ce_mask | kl_mask
        hidden = hidden_states(self.model, batch.input_ids, batch.attention_mask)
        logits = selected_logits(self.model, hidden, select)
        row_of = torch.arange(n, device=self.device).unsqueeze(1).expand_as(select)[select]
        is_ce = ce_mask[select]
        targets = batch.labels[:, 1:][select][is_ce]
        ce = per_row_mean(token_ce(logits[is_ce], targets), row_of[is_ce], n)
        if not kl_rows:
            return ce, None
        is_kl = kl_mask[select]
        base_ids = torch.cat([items[r].kl[0] for r in kl_rows]).to(self.device)  # type: ignore[index]
        base_lp = torch.cat([items[r].kl[1] for r in kl_rows]).to(self.device)  # type: ignore[index]
        kl = per_row_mean(topk_kl(logits[is_kl], base_ids, base_lp), row_of[is_kl], n)
        return ce, kl[kl_rows].mean()

    @torch.no_grad()
    def check_new(self) -> tuple[float, dict[str, float]]:
        """Share of new items whose every response token is the model's argmax, and each one's loss."""
        was_training = self.model.training
        self.model.eval()
        matched, losses = 0, {}
        try:
            keys = [f"new:{i}" for i in range(len(self.new))]
            for start in range(0, len(keys), self.settings.batch_size):
                interrupt.check()
                batch, items = self.batch(keys[start : start + self.settings.batch_size])
                mask = target_mask(batch.labels)
                hidden = hidden_states(self.model, batch.input_ids, batch.attention_mask)
                logits = selected_logits(self.model, hidden, mask)
                targets = batch.labels[:, 1:][mask]
                row_of = torch.arange(len(items), device=self.device).unsqueeze(1).expand_as(mask)[mask]
                ce = per_row_mean(token_ce(logits, targets), row_of, len(items))
                wrong = per_row_mean((logits.argmax(-1) != targets).float(), row_of, len(items))
                for r, it in enumerate(items):
                    losses[it.id] = float(ce[r])
                    matched += int(wrong[r] == 0)
        finally:
            self.model.train(was_training)
        return matched / max(len(self.new), 1), losses


@torch.no_grad()
def prompt_embeddings(model: PeftModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> torch.Tensor:
    """Unit-norm mean of the base model's middle-layer states over each raw prompt (adapter disabled).

    One prompt at a time, so the result never depends on batching (resume stays exact).
    """
    decoder, _ = decoder_and_head(model)
    device = model_device(model)
    was_training = model.training
    model.train(False)
    out = []
    try:
        with model.disable_adapter():
            for prompt in prompts:
                interrupt.check()
                ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"] or [0]], device=device)
                states = decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
                out.append(states[len(states) // 2][0].mean(0))
    finally:
        model.train(was_training)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def _trainer_state(
    run_id: str, state: _State, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler
) -> dict[str, Any]:
    return {
        "fingerprint": run_id,
        "loop": {k: v for k, v in state.__dict__.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": checkpoint.rng_state(),
    }


def train(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    new: Sequence[Example],
    replay_pool: Sequence[Example],
    anchors: Sequence[Anchor],
    settings: TrainSettings,
    *,
    ewc_term: EwcTerm | None = None,
    checkpoint_dir: Path | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    kl_cache_dir: Path | None = None,
) -> TrainOutcome:
    """Train the model's adapter in place on `new`, mixing in replay and anchors; see the module docstring.

    `model` must already carry the adapter to train (fresh or the previous version's). When
    `checkpoint_dir` holds a checkpoint written by a run with the same inputs, training resumes there.
    `kl_cache_dir` (one per base model) keeps the base model's KL targets for anchors between runs.
    """
    if not new:
        raise ValueError("nothing to train: no new examples")
    s = settings
    run = _Run(model, tokenizer, new, replay_pool, anchors, s, kl_cache_dir)
    total_steps = s.max_epochs * run.batches_per_epoch
    params = lora.trainable_params(model)
    optimizer = make_optimizer(list(params.values()), s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s, total_steps))
    run_id = run_fingerprint(s, new, replay_pool, anchors)
    state = _State()
    resumed_from: int | None = None
    torch.manual_seed(s.seed)

    if checkpoint_dir is not None:
        found = checkpoint.load_latest(checkpoint_dir)
        if found is not None and found[2].get("fingerprint") == run_id:
            path, adapter, saved = found
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(adapter[k])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            state = _State(**saved["loop"])
            checkpoint.set_rng_state(saved["rng"])
            resumed_from = state.step
            log.info("resuming from %s (step %d, epoch %d)", path, state.step, state.epoch)
        elif found is not None:
            log.warning("ignoring checkpoint %s: it belongs to a different run", found[0])

    def report(phase: Phase, step_seconds: float | None = None) -> None:
        if progress is None:
            return
        tps = state.tokens / state.seconds if state.seconds > 0 else 0.0
        per_step = state.seconds / state.step if state.step else 0.0
        progress(
            Progress(
                step=state.step,
                total_steps=total_steps,
                epoch=state.epoch,
                loss=state.last_loss,
                tokens_per_s=tps,
                eta_s=per_step * (total_steps - state.step),
                phase=phase,
                new_em=state.new_em,
            )
        )

    def write_checkpoint() -> Path | None:
        if checkpoint_dir is None:
            return None
        report("checkpoint")
        return checkpoint.save(
            checkpoint_dir,
            state.step,
            {k: p.detach() for k, p in params.items()},
            _trainer_state(run_id, state, optimizer, scheduler),
            s.keep_checkpoints,
        )

    def outcome(stopped: StopReason, ckpt: Path | None = None) -> TrainOutcome:
        return TrainOutcome(
            stopped=stopped,
            steps=state.step,
            total_steps=total_steps,
            epochs=state.epoch,
            final_loss=state.last_loss,
            new_em=state.new_em,
            example_losses=dict(state.example_losses),
            tokens=state.tokens,
            tokens_per_s=state.tokens / state.seconds if state.seconds else 0.0,
            train_seconds=state.seconds,
            resumed_from_step=resumed_from,
            checkpoint=str(ckpt) if ckpt is not None else None,
        )

    report("prepare")
    model.train()
    while state.epoch < s.max_epochs:
        if not state.plan:
            state.plan, state.batch_in_epoch = run.plan_epoch(state.epoch), 0
        while state.batch_in_epoch < len(state.plan):
            if should_stop is not None and should_stop():
                log.info("stop requested at step %d", state.step)
                return outcome("interrupted", write_checkpoint())
            started = time.perf_counter()
            batch, items = run.batch(state.plan[state.batch_in_epoch])
            ce, kl = run.losses(batch, items)
            loss = ce.mean()
            if kl is not None:
                loss = loss + s.kl_weight * kl
            if ewc_term is not None and ewc_term.weight > 0:
                loss = loss + 0.5 * ewc_term.weight * ewc.penalty(params, ewc_term.anchor, ewc_term.fisher)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(list(params.values()), s.grad_clip)
            optimizer.step()
            scheduler.step()
            for r, it in enumerate(items):
                if it.kind != "anchor":
                    state.example_losses[it.id] = float(ce[r].detach())
            state.step += 1
            state.batch_in_epoch += 1
            state.last_loss = float(loss.detach())
            state.tokens += batch.n_tokens
            state.seconds += time.perf_counter() - started
            report("train")
            if state.step % s.checkpoint_every == 0:
                write_checkpoint()
        report("check")
        state.new_em, new_losses = run.check_new()
        state.example_losses.update(new_losses)
        state.epoch += 1
        state.plan, state.batch_in_epoch = [], 0
        converged = s.early_stop_em is not None and state.new_em >= s.early_stop_em
        state.passes = state.passes + 1 if converged else 0
        log.info("epoch %d: loss %.4f, new items reproduced %.2f", state.epoch, state.last_loss or 0.0, state.new_em)
        if state.epoch >= s.min_epochs and state.passes >= s.early_stop_patience:
            report("done")
            return outcome("converged")
    report("done")
    return outcome("max_epochs")
