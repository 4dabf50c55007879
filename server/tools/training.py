"""Tools that start, follow and cancel training runs."""

from __future__ import annotations

from typing import Annotated

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from server import actions
from server.outputs import RunView, StatusResult, TrainStarted
from server.pickup import run_uri
from server.state import AppState
from server.tools._common import KernelArg, auto_status, kernel_info, kernel_name, run_view, state_of, tool
from store.models import Run
from train_worker.protocol import RunId, check_run_id


@tool
async def train_model(kernel: KernelArg, ctx: Context[AppState]) -> TrainStarted:
    """Start training a kernel on its untrained experiences. Returns at once; poll training_status."""
    state = state_of(ctx)
    name = kernel_name(kernel)
    await state.store.kernels.get(name)
    if state.layout.estop.exists():
        raise ToolError(
            f"training is stopped by the e-stop file {state.layout.estop}; an operator must remove it "
            "before any run, manual or automatic, can start"
        )
    run, existing = await state.dispatcher.request(name)
    if existing:
        message = f"run {run.id} for {name} is already {run.status}; this returns it instead of starting another"
    elif run.status == "queued":
        message = f"queued: another kernel's run holds the trainer; {run.id} starts when it ends"
    else:
        message = f"requested: the worker picks {run.id} up shortly; poll training_status(run_id=...)"
    return TrainStarted(
        run_id=run.id,
        kernel=name,
        status=run.status,
        status_uri=run_uri(run.id),
        already_active=existing,
        n_new=run.n_new,
        n_replay=run.n_replay,
        message=message,
    )


@tool
async def training_status(
    ctx: Context[AppState],
    run_id: Annotated[RunId | None, Field(description="A run id from train_model.")] = None,
    kernel: Annotated[str | None, Field(description="A kernel: its latest runs.")] = None,
) -> StatusResult:
    """A run's or a kernel's training status: phase, progress, loss, ETA, metrics, gates and errors."""
    state = state_of(ctx)
    await state.pickup.sweep()  # fresh progress, not the last background pass
    if run_id is not None:
        run = await state.store.runs.get(check_run_id(run_id))
        return StatusResult(run=await run_view(state, run, events=10))
    if kernel is not None:
        k = await state.store.kernels.get(kernel_name(kernel))
        runs = await state.store.runs.recent(k.name, limit=10)
        views = [await run_view(state, r) for r in runs]
        return StatusResult(
            run=views[0] if views else None,
            kernel=await kernel_info(state, k),
            runs=views,
            auto=await auto_status(state, k),
        )
    active = await state.store.runs.with_status("queued", "requested", "running", "evaluating")
    return StatusResult(runs=[await run_view(state, r) for r in active])


@tool
async def wait_for_training(
    run_id: Annotated[RunId, Field(description="A run id from train_model.")],
    ctx: Context[AppState],
    timeout_s: Annotated[float, Field(gt=0, le=3600, description="Return after this long even if not done.")] = 300,
) -> RunView:
    """Wait for a run to end (or the timeout), sending MCP progress notifications as it goes; returns the run."""
    state = state_of(ctx)
    run = await state.store.runs.get(run_id)
    last: tuple[object, ...] = ()
    with anyio.move_on_after(timeout_s):
        while run.active:
            seen = (run.status, run.phase, run.step)
            if seen != last:
                last = seen
                await ctx.report_progress(100 * (run.progress or 0.0), 100, message=_progress_line(run))
            await anyio.sleep(WAIT_POLL_S)
            await state.pickup.sweep()
            run = await state.store.runs.get(run_id)
    if not run.active:
        await ctx.report_progress(100, 100, message=f"{run.status}" + (f": {run.error}" if run.error else ""))
    return await run_view(state, run, events=10)


WAIT_POLL_S = 1.0


def _progress_line(run: Run) -> str:
    parts = [run.phase or run.status]
    if run.step is not None and run.total_steps:
        parts.append(f"step {run.step}/{run.total_steps}")
    if run.loss is not None:
        parts.append(f"loss {run.loss:.3f}")
    if run.eta_s is not None:
        parts.append(f"ETA {run.eta_s:.0f}s")
    if run.message:
        parts.append(run.message)
    return ", ".join(parts)


@tool
async def cancel_training(
    run_id: Annotated[RunId, Field(description="The run to cancel.")], ctx: Context[AppState]
) -> RunView:
    """Cancel a run: at once if no worker has it (one whose worker is gone is ended here), otherwise the worker
    stops within seconds in any phase. A run whose deploy has already committed cannot be cancelled."""
    state = state_of(ctx)
    run = await actions.cancel(state, run_id)
    return await run_view(state, run)
