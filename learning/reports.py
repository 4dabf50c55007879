"""Torch-free result models of training and evaluation, so the worker protocol and server can embed them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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
    replayed: list[str] = []


class ItemScore(BaseModel):
    """One greedy answer and how it scored.

    Groups: `new` (this run's items), `paraphrase` (their other wordings), `earlier` (every fact the
    kernel held before: its regression tests), `must_keep` (canaries and the kernel's must-keep list).
    For `earlier` and `must_keep`, `before` says whether the version being replaced answered right, and
    `em` whether this candidate still does.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    group: str
    prompt: str
    answer: str
    em: bool
    f1: float
    schema_ok: bool | None = None
    before: bool | None = None
    replayed: bool | None = None


class NewFact(BaseModel):
    """A new item, named where it overwrote an earlier one."""

    model_config = ConfigDict(extra="forbid")

    id: str
    prompt: str
    key_answer: str


class LostItem(BaseModel):
    """Something the replaced version answered right that this candidate does not."""

    model_config = ConfigDict(extra="forbid")

    id: str
    group: str
    prompt: str
    expected: str
    answer: str
    overwritten_by: NewFact | None = Field(
        default=None, description="The new fact whose answer it now gives, or the new fact of the same question form."
    )

    def describe(self) -> str:
        """One line for reports: what was asked, what it should say, what it says now, and why."""
        line = f"{self.prompt!r}: expected {self.expected!r}, now {self.answer[:80]!r}"
        if self.overwritten_by is not None:
            line += f" (overwritten by {self.overwritten_by.prompt!r} -> {self.overwritten_by.key_answer!r})"
        return line


class Routing(BaseModel):
    """Where a scoped evaluation sent its items (learning/scope.py): the counts that went the unexpected way."""

    model_config = ConfigDict(extra="forbid")

    new_out: int = Field(default=0, description="New questions the base answered (out of scope).")
    paraphrases_out: int = Field(default=0, description="Paraphrases of new facts the base answered.")
    earlier_out: int = Field(default=0, description="Earlier facts the base answered.")
    must_keep_in: int = Field(default=0, description="Canaries and must-keep facts the adapter answered.")
    probes_in: int = Field(default=0, description="General probes the adapter answered.")


class Metrics(BaseModel):
    """All metrics of one candidate; None means not measurable for this run."""

    model_config = ConfigDict(extra="forbid")

    acquisition_em: float | None = None
    acquisition_f1: float | None = None
    paraphrase_em: float | None = None
    paraphrase_f1: float | None = None
    retention_kept: float | None = None
    held_back_kept: float | None = None
    earlier_known: int | None = None
    earlier_lost: int | None = None
    must_keep_checked: int | None = None
    must_keep_lost: int | None = None
    anchor_agreement: float | None = None
    general_kept: float | None = None
    probes_checked: int | None = None
    lost: list[LostItem] = []
    lost_probes: list[str] = []
    ppl: float | None = None
    base_ppl: float | None = None
    ppl_ratio: float | None = None
    schema_compliance: float | None = None
    routing: Routing | None = Field(default=None, description="None: the adapter answered every item (no scope).")
    items: list[ItemScore] = []
    seconds: float = 0.0
