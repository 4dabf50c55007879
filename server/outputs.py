"""Structured results of the MCP tools (their `outputSchema`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from server.kernel_config import KernelConfig
from store.models import ExperienceSource, KernelStatus, RunStatus, RunTrigger, Verdict
from train_worker.protocol import Gate, LostItem


class KernelInfo(BaseModel):
    name: str
    uri: str
    base_model: str
    description: str
    status: KernelStatus
    deployed_version: int | None = Field(description="The adapter version serving queries; None: the bare base.")
    experiences: int
    untrained: int
    active_run: str | None = Field(description="The run queued or in progress, if any.")
    config: KernelConfig


class KernelList(BaseModel):
    kernels: list[KernelInfo]


class ExperienceIn(BaseModel):
    """One experience in a `record_experiences` batch."""

    prompt: str = Field(description="What the model is asked.")
    response: str = Field(description="The answer it should give.")
    system: str | None = Field(default=None, description="Optional system prompt the answer depends on.")
    source: ExperienceSource = "agent"
    idempotency_key: str | None = Field(default=None, max_length=200, description="Stored once per key.")
    key_answer: str | None = Field(
        default=None, description="The part of the response a correct answer must contain (used by the gates)."
    )
    paraphrases: list[str] = Field(default_factory=list, max_length=16, description="Other wordings of the prompt.")
    priority: float = Field(default=1.0, ge=0, le=100, description="Higher trains first.")


class Recorded(BaseModel):
    id: int
    duplicate: bool


class RecordResult(BaseModel):
    kernel: str
    ids: list[int] = Field(description="One id per submitted item, in order (existing ids for duplicates).")
    created: int
    duplicates: int
    superseded: list[int] = Field(
        default_factory=list,
        description="Experiences that corrections in this call replaced (same prompt): they no longer train, "
        "replay or count as regression tests.",
    )
    untrained: int = Field(description="The kernel's experiences not yet trained, after this call.")
    auto_run: str | None = Field(default=None, description="An automatic run this recording started.")


class RetireResult(BaseModel):
    experience_id: int
    kernel: str
    status: str
    reason: str
    untrained: int
    message: str


class TrainStarted(BaseModel):
    run_id: str
    kernel: str
    status: RunStatus
    status_uri: str
    already_active: bool = Field(description="True when this returns a run that was already queued or running.")
    n_new: int
    n_replay: int
    message: str


class EventView(BaseModel):
    seq: int
    ts: datetime
    phase: str
    step: int | None
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None
    message: str | None


class RunView(BaseModel):
    run_id: str
    kernel: str
    uri: str
    status: RunStatus
    trigger: RunTrigger
    phase: str | None
    progress: float | None = Field(description="0..1 through training.")
    step: int | None
    total_steps: int | None
    loss: float | None
    tokens_per_s: float | None
    eta_s: float | None = Field(description="Seconds until training ends, estimated.")
    message: str | None
    n_new: int
    n_replay: int
    base_version: int | None
    new_version: int | None
    metrics: dict[str, Any] | None
    gates: list[Gate]
    failed_gates: list[str]
    lost: list[LostItem] = Field(
        default_factory=list,
        description="Earlier or must-keep facts this run's candidate lost, each with the new fact that overwrote it: "
        "retire or correct the new fact, add paraphrases, or record the lost fact again.",
    )
    error: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    recent_events: list[EventView]


class StatusResult(BaseModel):
    run: RunView | None = Field(default=None, description="The run asked for, or the kernel's latest run.")
    kernel: KernelInfo | None = None
    auto: AutoStatus | None = Field(default=None, description="With kernel=: the automatic-training outlook.")
    runs: list[RunView] = Field(default_factory=list, description="Recent runs of the kernel, or all active runs.")


class QueryResult(BaseModel):
    kernel: str
    version: int | None = Field(
        description="The adapter version that answered; None: the bare base (nothing deployed, or the prompt "
        "names nothing the kernel was taught: see the serve_scope setting)."
    )
    response: str
    query_id: int = Field(description="Pass it to feedback to rate or correct this answer.")
    completion_tokens: int
    truncated: bool = Field(description="True when the answer hit max_new_tokens before it ended.")


class FeedbackResult(BaseModel):
    query_id: int
    rating: int
    verdict: Verdict = Field(description="gold (kept for replay), needs_improvement, corrected, or neutral.")
    correction_experience_id: int | None = Field(description="The training experience made from the correction.")
    superseded: list[int] = Field(
        default_factory=list, description="Experiences with this prompt that the correction replaced."
    )
    gold_experience_id: int | None = Field(description="The replay example made from a good answer.")
    retrain: int = Field(description="Trained experiences with this prompt that will be trained again.")
    untrained: int
    auto_run: str | None = Field(default=None, description="An automatic run this feedback started.")


class CorrectionResult(BaseModel):
    query_id: int
    suggestion: str = Field(description="What the client's model proposed.")
    model: str = Field(description="The client model that proposed it.")
    accepted: bool
    reason: str
    correction_experience_id: int | None = None
    untrained: int
    auto_run: str | None = None


class ReviewItem(BaseModel):
    query_id: int
    prompt: str
    response: str
    rating: int | None
    version: int | None
    created_at: datetime


class ReviewQueue(BaseModel):
    kernel: str
    items: list[ReviewItem]
    total: int = Field(description="All uncorrected bad answers of the kernel; items holds the worst `limit`.")


class AutoStatus(BaseModel):
    """Why the kernel's next automatic run is, or is not, due."""

    enabled: bool
    due: bool
    reasons: list[str]
    kernel_status: KernelStatus
    untrained: int
    min_untrained: int
    cooldown_remaining_s: float
    window: str | None
    in_window: bool
    breaker_open: bool
    consecutive_failures: int
    estop: bool
    drift: float | None = Field(description="KL (nats) of untrained experiences' words from the trained ones'.")


class RollbackResult(BaseModel):
    kernel: str
    from_version: int | None
    to_version: int | None
    message: str
