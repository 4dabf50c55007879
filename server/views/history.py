"""A kernel's history: a timeline of deploys, rejections and rollbacks, and what each version changed."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import anyio
from pydantic import BaseModel

from server.actions import RollbackRecord, rollback_history, version_name
from server.state import AppState
from server.views.reports import (
    REPORT_FILE,
    AnswerChange,
    ItemView,
    ReportRead,
    ReportSummary,
    answer_changes,
    read_report,
    summarize,
)
from store.models import Run, Version
from train_worker.deploy import KernelFiles

LEARNT_SHOWN = 200  # facts listed per version; the count says how many more there are
VERSIONS_SHOWN = 20  # newest versions shown in full (each reads its report); older ones are listed

EntryKind = Literal["deployed", "rejected", "failed", "cancelled", "rollback", "active"]
FINAL_KIND: dict[str, EntryKind] = {
    "deployed": "deployed",
    "rejected": "rejected",
    "failed": "failed",
    "cancelled": "cancelled",
}


class TimelineEntry(BaseModel):
    ts: datetime
    kind: EntryKind
    text: str
    run_id: str | None = None
    version: int | None = None


class LearntFact(BaseModel):
    experience_id: int
    prompt: str
    response: str
    answer: str | None = None
    em: bool | None = None


class VersionView(BaseModel):
    """One adapter version: its gates, what it learnt, what it lost, and how its answers moved."""

    version: int
    status: str
    serving: bool
    run_id: str | None
    parent: int | None
    created_at: datetime
    deployed_at: datetime | None
    converged: bool
    report: ReportSummary
    learnt: list[LearntFact]
    learnt_total: int
    changes: list[AnswerChange]
    compared_with: int | None


class OlderVersion(BaseModel):
    version: int
    status: str
    run_id: str | None
    created_at: datetime


class KernelHistory(BaseModel):
    kernel: str
    deployed_version: int | None
    timeline: list[TimelineEntry]
    versions: list[VersionView]
    older: list[OlderVersion]


async def kernel_history(state: AppState, kernel: str) -> KernelHistory:
    k = await state.store.kernels.get(kernel)
    runs = await state.store.runs.recent(kernel, limit=500)
    by_id = {r.id: r for r in runs}
    rows = await state.store.versions.for_kernel(kernel)
    newest = sorted(rows, key=lambda v: v.version, reverse=True)
    shown = [v for i, v in enumerate(newest) if i < VERSIONS_SHOWN or v.version == k.deployed_version]
    # Each shown version is compared with its parent, so the parents' reports are read too. A pruned version's
    # folder is gone, but its run folder keeps the report.
    parents = {r.base_version for r in runs if r.new_version in {v.version for v in shown}}
    reports = {v.version: await _version_report(state, kernel, v) for v in rows if v in shown or v.version in parents}
    versions = [await _version_view(state, v, by_id.get(v.run_id or ""), reports, k.deployed_version) for v in shown]
    older = [
        OlderVersion(version=v.version, status=v.status, run_id=v.run_id, created_at=v.created_at)
        for v in newest
        if v not in shown
    ]
    rollbacks = await anyio.to_thread.run_sync(rollback_history, state.layout, kernel)
    return KernelHistory(
        kernel=kernel,
        deployed_version=k.deployed_version,
        timeline=timeline(runs, rollbacks),
        versions=versions,
        older=older,
    )


def timeline(runs: list[Run], rollbacks: list[RollbackRecord]) -> list[TimelineEntry]:
    """Newest first."""
    entries: list[TimelineEntry] = []
    for run in runs:
        if run.active:
            entries.append(TimelineEntry(ts=run.created_at, kind="active", text=run.status, run_id=run.id))
            continue
        ended = run.finished_at or run.updated_at
        if run.status == "deployed":
            text = f"{version_name(run.new_version)} deployed ({run.n_new} new, {run.n_replay} replayed)"
        else:
            text = run.error or run.status
        entries.append(
            TimelineEntry(ts=ended, kind=FINAL_KIND[run.status], text=text, run_id=run.id, version=run.new_version)
        )
    for record in rollbacks:
        entries.append(
            TimelineEntry(
                ts=record.ts,
                kind="rollback",
                text=f"rolled back from {version_name(record.from_version)} to {version_name(record.to_version)}"
                f" (via {record.via})",
                version=record.to_version,
            )
        )
    return sorted(entries, key=lambda e: e.ts, reverse=True)


async def _version_report(state: AppState, kernel: str, version: Version) -> ReportRead:
    candidates = []
    if version.run_id:
        candidates.append(state.layout.run_dir(version.run_id) / REPORT_FILE)
    candidates.append(KernelFiles(state.layout, kernel).version_dir(version.version) / REPORT_FILE)
    return await anyio.to_thread.run_sync(lambda: read_report(*candidates))


async def _version_view(
    state: AppState, version: Version, run: Run | None, reports: dict[int, ReportRead], deployed: int | None
) -> VersionView:
    read = reports.get(version.version) or ReportRead(problem="no evaluation report")
    report = read.report
    parent = run.base_version if run else None
    previous = reports[parent].report if parent is not None and parent in reports else None
    learnt, total = await _learnt(state, run, report.items if report else [])
    return VersionView(
        version=version.version,
        status=version.status,
        serving=version.version == deployed,
        run_id=version.run_id,
        parent=parent,
        created_at=version.created_at,
        deployed_at=version.deployed_at,
        converged=version.converged,
        report=summarize(read),
        learnt=learnt,
        learnt_total=total,
        changes=answer_changes(report, previous) if report and previous else [],
        compared_with=parent if report and previous else None,
    )


async def _learnt(state: AppState, run: Run | None, items: list[ItemView]) -> tuple[list[LearntFact], int]:
    """The run's new experiences, each with its answer after training when the report scored it."""
    if run is None:
        return [], 0
    ids = await state.store.runs.item_ids(run.id, "new")
    scored = {i.id: i for i in items if i.group == "new"}
    facts = []
    for e in await state.store.experiences.with_ids(ids[:LEARNT_SHOWN]):
        item = scored.get(str(e.id))
        facts.append(
            LearntFact(
                experience_id=e.id,
                prompt=e.prompt,
                response=e.response,
                answer=item.answer if item else None,
                em=item.em if item else None,
            )
        )
    return facts, len(ids)
