"""`engrain status`, `engrain runs` and `engrain show RUN`: the dashboard's views in the terminal, with rich.

Each first records what the worker has written since the last look (as `training_status` does), then
renders; `--watch` repeats that until Ctrl-C, or until the run ends for `show`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import anyio
from mcp.server.subscriptions import InMemorySubscriptionBus
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from server.app import open_state
from server.outputs import RunView
from server.state import AppState
from server.views.kernels import Overview, overview
from server.views.reports import ReportSummary
from server.views.runs import RunDetail, recent_runs, run_detail
from server.views.text import count, duration
from store.models import ACTIVE_RUN_STATUSES
from train_worker.protocol import Gate, check_run_id
from train_worker.settings import Settings

log = logging.getLogger(__name__)

STATUS_STYLE = {
    "deployed": "green",
    "passed": "green",
    "rejected": "red",
    "failed": "red",
    "cancelled": "yellow",
    "skipped": "yellow",
    "running": "cyan",
    "evaluating": "cyan",
    "requested": "blue",
    "queued": "blue",
}
SPARKS = "▁▂▃▄▅▆▇█"


def _status(value: str) -> Text:
    return Text(value, style=STATUS_STYLE.get(value, ""))


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _version(value: int | None) -> str:
    return "base" if value is None else f"v{value}"


def _ago(moment: datetime | None) -> str:
    return "" if moment is None else duration((datetime.now(UTC) - moment).total_seconds()) + " ago"


def sparkline(values: Sequence[float], width: int = 48) -> str:
    """The last `width` values as block characters, scaled between their minimum and maximum."""
    tail = list(values)[-width:]
    if not tail:
        return ""
    low, high = min(tail), max(tail)
    span = (high - low) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - low) / span * len(SPARKS)))] for v in tail)


def _progress(run: RunView) -> str:
    """Active: share done and steps; ended: the steps it took (early stopping ends most runs before the plan)."""
    if run.status not in ACTIVE_RUN_STATUSES:
        return count(run.step, "step") if run.step else ""
    if run.progress is None:
        return ""
    text = f"{100 * run.progress:.0f}%"
    if run.step is not None and run.total_steps:
        text += f" {run.step}/{run.total_steps}"
    return text


def render_overview(view: Overview) -> RenderableType:
    table = Table(title="engrain kernels", title_justify="left", expand=False)
    for column in ("kernel", "status", "serves", "experiences", "untrained", "run", "auto", "breaker"):
        table.add_column(column, justify="right" if column in ("experiences", "untrained") else "left")
    for row in view.kernels:
        k, auto = row.info, row.auto
        if row.active_run:
            r = row.active_run
            run = Text.assemble(r.run_id, " ", _status(r.status), f" {r.phase or ''} {_progress(r)}")
            if r.eta_s is not None:
                run.append(f" ETA {duration(r.eta_s)}")
        elif row.last_run:
            r = row.last_run
            run = Text.assemble(r.run_id, " ", _status(r.status), f" {_ago(r.finished_at)}")
        else:
            run = Text("no run yet", style="dim")
        due = "off" if not auto.enabled else ("due" if auto.due else "not due")
        breaker = Text("open", style="red") if auto.breaker_open else Text("closed")
        breaker.append(f" ({auto.consecutive_failures})", style="dim")
        table.add_row(
            k.name,
            k.status,
            _version(k.deployed_version),
            f"{k.experiences} ({row.trained} trained)",
            str(k.untrained),
            run,
            due,
            breaker,
        )
    parts: list[RenderableType] = []
    if view.estop_since:
        parts.append(Text(f"E-STOP on since {view.estop_since:%Y-%m-%d %H:%M}: no run starts", style="bold red"))
    parts.append(table)
    for row in view.kernels:
        if row.auto.enabled or row.auto.breaker_open:
            reasons = "\n".join(f"  - {reason}" for reason in row.auto.reasons)
            parts.append(Text(f"{row.info.name}: automatic training\n{reasons}", style="dim"))
    if view.quarantined:
        parts.append(Text(f"{view.quarantined} refused files in quarantine/", style="yellow"))
    return Group(*parts)


def render_runs(runs: list[RunView]) -> RenderableType:
    table = Table(title="engrain runs", title_justify="left")
    for column in ("run", "kernel", "status", "trigger", "progress", "new", "version", "created", "outcome"):
        table.add_column(column)
    for r in runs:
        outcome = (", ".join(r.failed_gates) and f"failed: {', '.join(r.failed_gates)}") or (r.error or "")
        table.add_row(
            r.run_id,
            r.kernel,
            _status(r.status),
            r.trigger,
            _progress(r),
            str(r.n_new),
            "" if r.new_version is None else f"v{r.new_version}",
            f"{r.created_at.astimezone():%Y-%m-%d %H:%M}",
            outcome,
        )
    return table if runs else Text("no runs yet", style="dim")


def gates_table(gates: Sequence[Gate]) -> Table:
    table = Table(title="gates", title_justify="left")
    for column in ("gate", "value", "", "threshold", "margin", "result"):
        table.add_column(column, justify="right" if column in ("value", "threshold", "margin") else "left")
    for g in gates:
        margin = "-" if g.margin is None else f"{g.margin:+.3f}"
        table.add_row(g.name, _num(g.value), g.comparison, _num(g.threshold), margin, _status(g.status))
    return table


def render_report(report: ReportSummary) -> RenderableType:
    if report.problem:
        return Text(report.problem, style="dim")
    parts: list[RenderableType] = [gates_table(report.gates)]
    for group in report.groups:
        parts.append(Text(f"{group.name}: {count(len(group.items), 'item')}, {100 * group.em_rate:.0f}% right"))
    for named in report.lists:
        lines = "\n".join(f"  - {entry}" for entry in named.entries[:20])
        more = f"\n  ... and {len(named.entries) - 20} more" if len(named.entries) > 20 else ""
        parts.append(Text(f"{named.name.replace('_', ' ')} ({len(named.entries)}):\n{lines}{more}"))
    return Group(*parts)


def render_run(detail: RunDetail) -> RenderableType:
    r = detail.run
    phase = r.phase if r.phase and r.phase != r.status else ""
    head = Text.assemble((r.run_id, "bold"), f"  kernel {r.kernel}  ", _status(r.status), f"  {phase}  {_progress(r)}")
    facts = Text(
        f"loss {_num(r.loss, 4)}   tokens/s {_num(r.tokens_per_s, 1)}   "
        f"ETA {duration(r.eta_s) if detail.active else '-'}   elapsed {duration(detail.elapsed_s)}   "
        f"{r.n_new} new, {r.n_replay} replayed, from {_version(r.base_version)}"
        + (f" -> v{r.new_version}" if r.new_version is not None else "")
    )
    parts: list[RenderableType] = [head, facts]
    losses = [p.loss for p in detail.points if p.loss is not None]
    if losses:
        parts.append(Text(f"loss  {sparkline(losses)}  {losses[0]:.3f} -> {losses[-1]:.3f}"))
    speeds = [p.tokens_per_s for p in detail.points if p.tokens_per_s is not None]
    if speeds:
        parts.append(Text(f"tok/s {sparkline(speeds)}  last {speeds[-1]:.1f}"))
    if r.message and r.message != r.status:
        parts.append(Text(r.message, style="dim"))
    if r.error:
        parts.append(Text(r.error, style="red"))
    if detail.report is not None:
        parts.append(render_report(detail.report))
    elif r.gates:
        parts.append(gates_table(r.gates))
    return Panel(Group(*parts), title="run", title_align="left")


Build = Callable[[AppState], Awaitable[tuple[RenderableType, bool]]]


async def _sweep(state: AppState) -> None:
    try:
        await state.pickup.sweep()
    except Exception as exc:  # another process may be recording the same files; show what the store has
        log.warning("could not record the worker's latest files: %s", exc)


async def _show(settings: Settings, build: Build, watch: bool, interval: float, console: Console) -> int:
    async with open_state(settings, InMemorySubscriptionBus(), services=False, watch=False, autotrain=False) as state:
        await _sweep(state)
        renderable, finished = await build(state)
        if not watch:
            console.print(renderable)
            return 0
        with Live(renderable, console=console, refresh_per_second=4, transient=False) as live:
            while not finished:
                await anyio.sleep(interval)
                await _sweep(state)
                renderable, finished = await build(state)
                live.update(renderable)
    return 0


def status(settings: Settings, watch: bool, interval: float, console: Console | None = None) -> int:
    async def build(state: AppState) -> tuple[RenderableType, bool]:
        return render_overview(await overview(state)), False

    return _run(settings, build, watch, interval, console)


def runs(settings: Settings, kernel: str | None, limit: int, watch: bool, interval: float) -> int:
    async def build(state: AppState) -> tuple[RenderableType, bool]:
        return render_runs(await recent_runs(state, kernel, limit)), False

    return _run(settings, build, watch, interval, None)


def show(settings: Settings, run_id: str, watch: bool, interval: float) -> int:
    check_run_id(run_id)

    async def build(state: AppState) -> tuple[RenderableType, bool]:
        detail = await run_detail(state, run_id)
        return render_run(detail), not detail.active

    return _run(settings, build, watch, interval, None)


def _run(settings: Settings, build: Build, watch: bool, interval: float, console: Console | None) -> int:
    try:
        return anyio.run(_show, settings, build, watch, interval, console or Console())
    except KeyboardInterrupt:
        return 0
