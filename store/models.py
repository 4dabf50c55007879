"""Typed rows returned by the repositories."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

import aiosqlite
from pydantic import BaseModel, ConfigDict, Field, field_validator

KernelStatus = Literal["active", "converged", "paused"]
ExperienceSource = Literal["agent", "correction", "import", "feedback"]
Verdict = Literal["gold", "needs_improvement", "corrected", "neutral"]
ExperienceStatus = Literal["new", "trained", "needs_improvement", "excluded", "superseded", "retired"]
RunStatus = Literal["queued", "requested", "running", "evaluating", "deployed", "rejected", "failed", "cancelled"]
RunTrigger = Literal["manual", "auto"]
VersionStatus = Literal["available", "deployed", "retired", "pruned"]

ACTIVE_RUN_STATUSES: tuple[RunStatus, ...] = ("queued", "requested", "running", "evaluating")
FINAL_RUN_STATUSES: tuple[RunStatus, ...] = ("deployed", "rejected", "failed", "cancelled")
UNTRAINED_STATUSES: tuple[ExperienceStatus, ...] = ("new", "needs_improvement")


class Row(BaseModel):
    model_config = ConfigDict(frozen=True)

    @classmethod
    def from_row(cls, row: aiosqlite.Row) -> Any:
        return cls.model_validate(dict(zip(row.keys(), row, strict=True)))


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


class Kernel(Row):
    name: str
    base_model: str
    description: str
    config: dict[str, Any]
    deployed_version: int | None
    status: KernelStatus
    created_at: datetime
    updated_at: datetime
    breaker_reset_at: datetime | None = None

    _parse_config = field_validator("config", mode="before")(_json)


class NewExperience(BaseModel):
    """An experience as an agent submits it, already validated against the server's limits."""

    prompt: str
    response: str
    system: str | None = None
    key_answer: str | None = None
    paraphrases: list[str] = Field(default_factory=list)
    source: ExperienceSource = "agent"
    priority: float = 1.0
    idempotency_key: str | None = None
    interaction_id: int | None = None
    status: ExperienceStatus = "new"


class Experience(Row):
    id: int
    kernel: str
    prompt: str
    response: str
    system: str | None
    key_answer: str | None
    paraphrases: list[str]
    source: ExperienceSource
    status: ExperienceStatus
    priority: float
    idempotency_key: str | None
    content_hash: str
    trained_run_id: str | None
    last_loss: float | None
    interaction_id: int | None
    created_at: datetime
    updated_at: datetime
    superseded_by: int | None = None
    retired_reason: str | None = None

    _parse_paraphrases = field_validator("paraphrases", mode="before")(_json)


class AddedExperience(BaseModel):
    id: int
    duplicate: bool = Field(description="True when an identical experience or key was already stored.")
    superseded: list[int] = Field(
        default_factory=list, description="Experiences this correction replaced (the same prompt and system text)."
    )


class Run(Row):
    id: str
    kernel: str
    status: RunStatus
    trigger: RunTrigger
    phase: str | None
    step: int | None
    total_steps: int | None
    progress: float | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    message: str | None
    n_new: int
    n_replay: int
    base_version: int | None
    new_version: int | None
    metrics: dict[str, Any] | None
    gates: list[dict[str, Any]] | None
    lost: list[dict[str, Any]] | None = None
    error: str | None
    cancel_requested: bool
    events_offset: int
    created_at: datetime
    requested_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    _parse_json = field_validator("metrics", "gates", "lost", mode="before")(_json)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_RUN_STATUSES


class RunEvent(Row):
    run_id: str
    seq: int
    ts: datetime
    phase: str
    step: int | None
    total_steps: int | None
    epoch: float | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    message: str | None


class Version(Row):
    kernel: str
    version: int
    run_id: str | None
    path: str
    metrics: dict[str, Any] | None
    status: VersionStatus
    converged: bool
    created_at: datetime
    deployed_at: datetime | None

    _parse_metrics = field_validator("metrics", mode="before")(_json)


class Interaction(Row):
    id: int
    kernel: str
    version: int | None
    prompt: str
    system: str | None
    response: str
    latency_ms: float | None
    rating: int | None
    correction: str | None
    correction_experience_id: int | None
    created_at: datetime
    feedback_at: datetime | None
    verdict: Verdict | None


class QuarantineEntry(Row):
    id: int
    original: str
    stored_as: str
    reason: str
    created_at: datetime
