"""A run as people follow it: the tool's run view, its progress curve from `events.jsonl`, and its report."""

from __future__ import annotations

from datetime import datetime

import anyio
from pydantic import BaseModel, Field

from server.outputs import RunView
from server.state import AppState
from server.tools import run_view
from server.views.reports import REPORT_FILE, ReportSummary, read_report, summarize
from store.models import ACTIVE_RUN_STATUSES
from train_worker.deploy import KernelFiles
from train_worker.protocol import ProgressEvent, read_events

MAX_EVENTS = 100_000  # a run's store mirror, when its events.jsonl is gone


class Point(BaseModel):
    """One training event: where the curves get their points."""

    seconds: float
    step: int
    loss: float | None
    tokens_per_s: float | None


class PhaseMark(BaseModel):
    """When the run entered a phase (its first event of that phase in a row)."""

    phase: str
    ts: datetime
    seconds: float
    message: str | None


class RunDetail(BaseModel):
    run: RunView
    points: list[Point]
    phases: list[PhaseMark]
    event_problems: list[str]
    report: ReportSummary | None = Field(default=None, description="Once the run has ended.")

    @property
    def active(self) -> bool:
        return self.run.status in ACTIVE_RUN_STATUSES

    @property
    def elapsed_s(self) -> float | None:
        return self.phases[-1].seconds if self.phases else None


async def run_detail(state: AppState, run_id: str) -> RunDetail:
    """Everything the run page and `engrain show` display; the report once the run has ended."""
    run = await state.store.runs.get(run_id)
    view = await run_view(state, run, events=10)
    events, problems = await _events(state, run_id)
    report = None
    if not run.active:
        candidates = [state.layout.run_dir(run_id) / REPORT_FILE]
        if run.new_version is not None:
            candidates.append(KernelFiles(state.layout, run.kernel).version_dir(run.new_version) / REPORT_FILE)
        report = summarize(await anyio.to_thread.run_sync(lambda: read_report(*candidates)))
    return RunDetail(run=view, points=points(events), phases=phases(events), event_problems=problems, report=report)


async def _events(state: AppState, run_id: str) -> tuple[list[ProgressEvent], list[str]]:
    path = state.layout.run_dir(run_id) / "events.jsonl"
    if path.exists():
        events, _, problems = await anyio.to_thread.run_sync(read_events, path, 0)
        return events, problems
    mirrored = await state.store.runs.events(run_id, limit=MAX_EVENTS)
    return [ProgressEvent.model_validate(e.model_dump()) for e in mirrored], []


def points(events: list[ProgressEvent]) -> list[Point]:
    if not events:
        return []
    start = events[0].ts
    return [
        Point(seconds=(e.ts - start).total_seconds(), step=e.step, loss=e.loss, tokens_per_s=e.tokens_per_s)
        for e in events
        if e.phase == "training" and e.step is not None
    ]


def phases(events: list[ProgressEvent]) -> list[PhaseMark]:
    marks: list[PhaseMark] = []
    if not events:
        return marks
    start = events[0].ts
    for e in events:
        if not marks or marks[-1].phase != e.phase:
            marks.append(PhaseMark(phase=e.phase, ts=e.ts, seconds=(e.ts - start).total_seconds(), message=e.message))
    return marks


async def recent_runs(state: AppState, kernel: str | None = None, limit: int = 50) -> list[RunView]:
    runs = await (state.store.runs.recent(kernel, limit) if kernel else state.store.runs.latest(limit))
    return [await run_view(state, r, events=0) for r in runs]
