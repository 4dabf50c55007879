"""A run's evaluation report (`eval_report.json`, written by the worker), read for people to look at.

The worker's report model (metrics, their per-item scores, the gate report) grows as evaluation learns to
measure more, so this reader keeps every field it does not know: item groups are whatever `group` values
the items carry, and every list in the metrics (lost probes, lost facts, ...) is shown under its own name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from train_worker.protocol import Gate

REPORT_FILE = "eval_report.json"


class ItemView(BaseModel):
    """One greedy answer and how it scored (the worker's `ItemScore`, extra fields kept)."""

    model_config = ConfigDict(extra="allow")

    id: str
    group: str
    prompt: str
    answer: str
    em: bool
    f1: float
    schema_ok: bool | None = None


class GateReportView(BaseModel):
    model_config = ConfigDict(extra="allow")

    passed: bool
    gates: list[Gate]
    failing: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)


class EvalReportView(BaseModel):
    model_config = ConfigDict(extra="allow")

    metrics: dict[str, Any]
    gates: GateReportView
    outcome: dict[str, Any] | None = None
    items: list[ItemView] = Field(default_factory=list, description="metrics.items, validated.")

    @model_validator(mode="before")
    @classmethod
    def _lift_items(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
            return {**data, "items": data["metrics"].get("items") or []}
        return data


class ItemGroup(BaseModel):
    name: str
    items: list[ItemView]

    @property
    def em_rate(self) -> float:
        return sum(i.em for i in self.items) / len(self.items) if self.items else 0.0


class NamedList(BaseModel):
    """A list the report carries, e.g. `lost_probes`; entries are text or small records."""

    name: str
    entries: list[Any]


class AnswerChange(BaseModel):
    """The same question answered by the previous version and by this one."""

    group: str
    prompt: str
    before: str
    after: str
    em_before: bool
    em_after: bool

    @property
    def verdict(self) -> str:
        if self.em_before and not self.em_after:
            return "lost"
        if self.em_after and not self.em_before:
            return "gained"
        return "changed"


class ReportRead(BaseModel):
    """A report, or why there is none to show."""

    report: EvalReportView | None = None
    problem: str | None = None
    path: str | None = None


def read_report(*candidates: Path) -> ReportRead:
    """The first of `candidates` that exists, validated; a bad file becomes a `problem`, never an exception."""
    for path in candidates:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            return ReportRead(problem=f"cannot read {path}: {exc.strerror or exc}", path=str(path))
        try:
            report = EvalReportView.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            return ReportRead(problem=f"{path.name} does not match the report format: {_short(exc)}", path=str(path))
        return ReportRead(report=report, path=str(path))
    return ReportRead(problem="no evaluation report (the run ended before evaluating)")


class ReportSummary(BaseModel):
    """What a page shows of a report: gates, numbers, items by group, and every list."""

    passed: bool | None = None
    gates: list[Gate] = Field(default_factory=list)
    metrics: list[tuple[str, float]] = Field(default_factory=list)
    groups: list[ItemGroup] = Field(default_factory=list)
    lists: list[NamedList] = Field(default_factory=list)
    problem: str | None = None


def summarize(read: ReportRead) -> ReportSummary:
    report = read.report
    if report is None:
        return ReportSummary(problem=read.problem)
    return ReportSummary(
        passed=report.gates.passed,
        gates=report.gates.gates,
        metrics=scalar_metrics(report),
        groups=item_groups(report),
        lists=report_lists(report),
    )


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()
    return "; ".join(text[:3])


def item_groups(report: EvalReportView) -> list[ItemGroup]:
    """Items by group, in the order groups first appear."""
    groups: dict[str, list[ItemView]] = {}
    for item in report.items:
        groups.setdefault(item.group, []).append(item)
    return [ItemGroup(name=name, items=items) for name, items in groups.items()]


def report_lists(report: EvalReportView) -> list[NamedList]:
    """Every non-empty list in the metrics and at the report's top level, except the items themselves."""
    found: list[NamedList] = []
    extra = report.model_extra or {}
    for source in (report.metrics, extra):
        for name, value in source.items():
            if name != "items" and isinstance(value, list) and value:
                found.append(NamedList(name=name, entries=value))
    return found


def scalar_metrics(report: EvalReportView) -> list[tuple[str, float]]:
    return [
        (name, float(value))
        for name, value in report.metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def answer_changes(current: EvalReportView, previous: EvalReportView) -> list[AnswerChange]:
    """Questions both reports answered whose answers differ; lost ones first, then gained, then other changes."""
    before = {item.prompt: item for item in previous.items}
    changes = [
        AnswerChange(
            group=item.group,
            prompt=item.prompt,
            before=old.answer,
            after=item.answer,
            em_before=old.em,
            em_after=item.em,
        )
        for item in current.items
        if (old := before.get(item.prompt)) is not None and old.answer.strip() != item.answer.strip()
    ]
    order = {"lost": 0, "gained": 1, "changed": 2}
    return sorted(changes, key=lambda c: order[c.verdict])
