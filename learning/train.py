"""The training loop: one run over its dataset (learning/dataset.py), LoRA only, plain PyTorch.

Each epoch takes every new item, the run's replay set, the neighbour and nearest anchors, and a fresh
sample of the other anchors, bucketed by length into batches. The loss is the per-item mean
cross-entropy over response tokens, plus KL to the base model on anchor rows and an optional EWC
penalty. After every optimizer step `after_step` may constrain the update (learning/nullspace.py).
After each epoch one teacher-forced pass tells whether greedy decoding reproduces every new item,
which drives early stopping. A checkpoint with the full state is written every `checkpoint_every`
steps and when `should_stop()` turns true; a later call with the same inputs and checkpoint
directory resumes from the newest one and ends with the same adapter as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from learning import checkpoint, ewc, lora
from learning.anchors import Anchor
from learning.batching import collate
from learning.config import TrainSettings
from learning.dataset import RunData
from learning.examples import Example
from learning.formatting import IGNORE_INDEX, Encoded
from learning.greedy_check import follows
from learning.losses import hidden_states, per_row_mean, selected_logits, target_mask, token_ce, topk_kl
from learning.model_loading import model_device
from learning.reports import Phase, Progress, StopReason, TrainOutcome

log = logging.getLogger(__name__)


@dataclass
class EwcTerm:
    """The previous version's parameters and (normalised) Fisher, and the penalty weight."""

    anchor: dict[str, torch.Tensor]
    fisher: dict[str, torch.Tensor]
    weight: float


@dataclass
class _State:
    """Everything that changes during a run and must survive a restart."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    plan: list[list[int]] = field(default_factory=list)
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


def losses(
    model: PeftModel, data: RunData, rows: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row mean response CE [B], and the mean KL to the base over rows that carry KL targets (or None)."""
    items = [data.items[i] for i in rows]
    device = model_device(model)
    batch = collate([it.encoded for it in items], range(len(items)), pad_id).to(device)
    n = len(items)
    ce_mask = target_mask(batch.labels)
    kl_mask = torch.zeros_like(ce_mask)
    kl_rows = [r for r, it in enumerate(items) if it.kl is not None]
    for r in kl_rows:
        kl_mask[r, : len(items[r].encoded) - 1] = True
    select = ce_mask | kl_mask
    hidden = hidden_states(model, batch.input_ids, batch.attention_mask)
    logits = selected_logits(model, hidden, select)
    row_of = torch.arange(n, device=device).unsqueeze(1).expand_as(select)[select]
    is_ce = ce_mask[select]
    targets = batch.labels[:, 1:][select][is_ce]
    ce = per_row_mean(token_ce(logits[is_ce], targets), row_of[is_ce], n)
    if not kl_rows:
        return ce, None
    is_kl = kl_mask[select]
    base_ids = torch.cat([items[r].kl[0] for r in kl_rows]).to(device)  # type: ignore[index]
    base_lp = torch.cat([items[r].kl[1] for r in kl_rows]).to(device)  # type: ignore[index]
    kl = per_row_mean(topk_kl(logits[is_kl], base_ids, base_lp), row_of[is_kl], n)
    return ce, kl[kl_rows].mean()


def reproduced(model: PeftModel, data: RunData, pad_id: int) -> tuple[float, dict[str, float]]:
    """Share of new items greedy decoding reproduces exactly, and each new item's loss (one teacher-forced pass)."""
    rows = data.new
    prompts = [_prompt_part(data.items[i].encoded) for i in rows]
    targets = [_target_part(data.items[i].encoded) for i in rows]
    checks = follows(model, prompts, targets, pad_id)
    return sum(c.reproduced for c in checks) / max(len(rows), 1), {
        data.items[i].id: c.loss for i, c in zip(rows, checks, strict=True)
    }


def _prompt_part(enc: Encoded) -> list[int]:
    return [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label == IGNORE_INDEX]


def _target_part(enc: Encoded) -> list[int]:
    return [label for label in enc.labels if label != IGNORE_INDEX]


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
    data: RunData,
    settings: TrainSettings,
    *,
    fingerprint: str,
    ewc_term: EwcTerm | None = None,
    after_step: Callable[[], None] | None = None,
    checkpoint_dir: Path | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainOutcome:
    """Train the model's adapter in place on the run's data; see the module docstring.

    `model` must already carry the adapter to train (fresh, continued or grown). `after_step` runs
    after every optimizer step (null-space projection). When `checkpoint_dir` holds a checkpoint
    written by a run with the same `fingerprint`, training resumes there.
    """
    if not data.new:
        raise ValueError("nothing to train: no new examples")
    s = settings
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    total_steps = s.max_epochs * data.batches_per_epoch(s.batch_size)
    params = lora.trainable_params(model)
    optimizer = make_optimizer(list(params.values()), s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s, total_steps))
    state = _State()
    resumed_from: int | None = None
    torch.manual_seed(s.seed)

    if checkpoint_dir is not None:
        found = checkpoint.load_latest(checkpoint_dir)
        if found is not None and found[2].get("fingerprint") == fingerprint:
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

    def report(phase: Phase) -> None:
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
            _trainer_state(fingerprint, state, optimizer, scheduler),
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
            replayed=data.replayed,
        )

    report("prepare")
    model.train()
    while state.epoch < s.max_epochs:
        if not state.plan:
            state.plan, state.batch_in_epoch = data.epoch(state.epoch, s.batch_size, s.seed), 0
        while state.batch_in_epoch < len(state.plan):
            if should_stop is not None and should_stop():
                log.info("stop requested at step %d", state.step)
                return outcome("interrupted", write_checkpoint())
            started = time.perf_counter()
            rows = state.plan[state.batch_in_epoch]
            ce, kl = losses(model, data, rows, pad_id)
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
            if after_step is not None:
                after_step()
            for r, i in enumerate(rows):
                if data.items[i].kind in ("new", "replay"):
                    state.example_losses[data.items[i].id] = float(ce[r].detach())
            state.step += 1
            state.batch_in_epoch += 1
            state.last_loss = float(loss.detach())
            state.tokens += sum(len(data.items[i].encoded) for i in rows)
            state.seconds += time.perf_counter() - started
            report("train")
            if state.step % s.checkpoint_every == 0:
                write_checkpoint()
        report("check")
        state.new_em, new_losses = reproduced(model, data, pad_id)
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
