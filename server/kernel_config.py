"""A kernel's stored configuration: how it trains, which gates guard it, and its answer schema.

It is stored with only the values that differ from the defaults (`stored()`), so a kernel follows
improved defaults after an upgrade unless it was configured otherwise.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.policy import AutoTrainPolicy
from train_worker.protocol import GateThresholds, KeepFact, TrainSettings


class KernelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: TrainSettings = Field(default_factory=TrainSettings)
    gates: GateThresholds = Field(default_factory=GateThresholds)
    output_schema: dict[str, Any] | None = Field(
        default=None, description="JSON Schema every answer must satisfy (checked by a gate)."
    )
    auto: AutoTrainPolicy = Field(default_factory=AutoTrainPolicy)
    sampling_corrections: bool = Field(
        default=False,
        description="Allow request_correction to ask the client's model (MCP sampling) for corrections.",
    )
    must_keep: list[KeepFact] = Field(
        default_factory=list,
        description="Facts this kernel must never lose, checked beside the built-in canaries by the must-keep gate.",
    )
    max_new_per_run: int = Field(default=256, ge=1, le=100_000, description="New experiences taken per run.")
    replay_pool_max: int = Field(
        default=10_000,
        ge=0,
        le=100_000,
        description="Trained experiences sent with a run: every one is a regression test, and the run rehearses "
        "the ones nearest to its new facts.",
    )

    def stored(self) -> dict[str, Any]:
        """What the store keeps: only what differs from the defaults."""
        return self.model_dump(mode="json", exclude_defaults=True)
