"""Torch-free result models of training and evaluation, so the worker protocol and server can embed them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Phase = Literal["prepare", "train", "check", "checkpoint", "fisher", "evaluate", "done"]
StopReason = Literal["converged", "max_epochs", "interrupted"]


class Progress(BaseModel):
    """One progress report, sent after every optimizer step and at phase changes."""

    model_config = ConfigDict(extra="forbid")

    step: int
    total_steps: int
    epoch: int
    loss: float | None
    tokens_per_s: float
    eta_s: float
    phase: Phase
    new_em: float | None = None


class TrainOutcome(BaseModel):
    """What a run did; `example_losses` holds each new/replay item's last loss, for prioritised replay."""

    model_config = ConfigDict(extra="forbid")

    stopped: StopReason
    steps: int
    total_steps: int
    epochs: int
    final_loss: float | None
    new_em: float | None
    example_losses: dict[str, float]
    tokens: int
    tokens_per_s: float
    train_seconds: float
    resumed_from_step: int | None = None
    checkpoint: str | None = None


class ItemScore(BaseModel):
    """One greedy answer and how it scored."""

    model_config = ConfigDict(extra="forbid")

    id: str
    group: str
    prompt: str
    answer: str
    em: bool
    f1: float
    schema_ok: bool | None = None


class Metrics(BaseModel):
    """All metrics of one candidate; None means not measurable for this run."""

    model_config = ConfigDict(extra="forbid")

    acquisition_em: float | None = None
    acquisition_f1: float | None = None
    paraphrase_em: float | None = None
    paraphrase_f1: float | None = None
    retention_em: float | None = None
    retention_f1: float | None = None
    anchor_agreement: float | None = None
    general_kept: float | None = None
    probe_accuracy: float | None = None
    base_probe_accuracy: float | None = None
    lost_probes: list[str] = []
    ppl: float | None = None
    base_ppl: float | None = None
    ppl_ratio: float | None = None
    schema_compliance: float | None = None
    items: list[ItemScore] = []
    seconds: float = 0.0
