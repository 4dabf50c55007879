"""Structured results of the MCP tools (their `outputSchema`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from server.kernel_config import KernelConfig
from store.models import ExperienceSource, KernelStatus, RunStatus, RunTrigger
from train_worker.protocol import Gate


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
    untrained: int = Field(description="The kernel's experiences not yet trained, after this call.")


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
    error: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    recent_events: list[EventView]


class StatusResult(BaseModel):
    run: RunView | None = Field(default=None, description="The run asked for, or the kernel's latest run.")
    kernel: KernelInfo | None = None
    runs: list[RunView] = Field(default_factory=list, description="Recent runs of the kernel, or all active runs.")


class QueryResult(BaseModel):
    kernel: str
    version: int | None = Field(description="The adapter version that answered; None: the bare base.")
    response: str
    query_id: int = Field(description="Pass it to feedback to rate or correct this answer.")
    completion_tokens: int
    truncated: bool = Field(description="True when the answer hit max_new_tokens before it ended.")


class FeedbackResult(BaseModel):
    query_id: int
    rating: int
    correction_experience_id: int | None
    untrained: int


class RollbackResult(BaseModel):
    kernel: str
    from_version: int | None
    to_version: int | None
    message: str
