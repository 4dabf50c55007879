"""Deployment gates: compare a candidate's metrics with the kernel's thresholds (torch-free)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from learning.config import GateThresholds
from learning.reports import Metrics

Comparison = Literal[">=", "<="]
GateStatus = Literal["passed", "failed", "skipped"]


class Gate(BaseModel):
    """One gate's outcome; `margin` is positive when the value clears the threshold with room to spare."""

    model_config = ConfigDict(extra="forbid")

    name: str
    metric: str
    value: float | None
    threshold: float | None
    comparison: Comparison
    status: GateStatus
    passed: bool | None
    margin: float | None
    reason: str | None = None


class GateReport(BaseModel):
    """All gates; `passed` is True when no measured gate failed. Skipped gates are listed, never counted as passes."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    gates: list[Gate]
    failing: list[str]
    skipped: list[str]

    def summary(self) -> str:
        """One line naming each failing gate and by how much it missed."""
        if self.passed:
            return "all gates passed" + (f" ({', '.join(self.skipped)} skipped)" if self.skipped else "")
        parts = [
            f"{g.name} {g.value:.3f} {g.comparison} {g.threshold:.3f} missed by {-(g.margin or 0):.3f}"
            + (f" ({g.reason})" if g.reason else "")
            for g in self.gates
            if g.status == "failed" and g.value is not None and g.threshold is not None
        ]
        return "failed: " + "; ".join(parts)


def _gate(
    name: str,
    metric: str,
    value: float | None,
    threshold: float | None,
    comparison: Comparison,
    lost: str | None = None,
) -> Gate:
    if threshold is None:
        return Gate(
            name=name,
            metric=metric,
            value=value,
            threshold=None,
            comparison=comparison,
            status="skipped",
            passed=None,
            margin=None,
            reason="no threshold set",
        )
    if value is None:
        return Gate(
            name=name,
            metric=metric,
            value=None,
            threshold=threshold,
            comparison=comparison,
            status="skipped",
            passed=None,
            margin=None,
            reason="not measurable for this run",
        )
    margin = value - threshold if comparison == ">=" else threshold - value
    ok = margin >= -1e-9
    return Gate(
        name=name,
        metric=metric,
        value=value,
        threshold=threshold,
        comparison=comparison,
        status="passed" if ok else "failed",
        passed=ok,
        margin=margin,
        reason=lost if not ok else None,
    )


def _lost(metrics: Metrics, group: str, limit: int = 5) -> str | None:
    """The first few lost items of a group, each with the new fact that overwrote it, for a gate's reason."""
    items = [item for item in metrics.lost if item.group == group]
    if not items:
        return None
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "lost " + "; ".join(item.describe() for item in items[:limit]) + more


def apply_gates(metrics: Metrics, thresholds: GateThresholds) -> GateReport:
    """Evaluate every gate against its threshold."""
    t = thresholds
    gates = [
        _gate("acquisition", "acquisition_em", metrics.acquisition_em, t.min_acquisition_em, ">="),
        _gate("paraphrase", "paraphrase_em", metrics.paraphrase_em, t.min_paraphrase_em, ">="),
        _gate(
            "retention",
            "retention_kept",
            metrics.retention_kept,
            t.min_retention_kept,
            ">=",
            _lost(metrics, "earlier"),
        ),
        _gate(
            "must_keep",
            "must_keep_lost",
            None if metrics.must_keep_lost is None else float(metrics.must_keep_lost),
            None if t.max_must_keep_lost is None else float(t.max_must_keep_lost),
            "<=",
            _lost(metrics, "must_keep"),
        ),
        _gate("anchor_agreement", "anchor_agreement", metrics.anchor_agreement, t.min_anchor_agreement, ">="),
        _gate("general_kept", "general_kept", metrics.general_kept, t.min_general_kept, ">="),
        _gate("perplexity", "ppl_ratio", metrics.ppl_ratio, t.max_ppl_ratio, "<="),
        _gate("schema", "schema_compliance", metrics.schema_compliance, t.min_schema_compliance, ">="),
    ]
    failing = [g.name for g in gates if g.status == "failed"]
    skipped = [g.name for g in gates if g.status == "skipped"]
    return GateReport(passed=not failing, gates=gates, failing=failing, skipped=skipped)
