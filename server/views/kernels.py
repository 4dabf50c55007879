"""Every kernel at a glance: the tools' kernel info and auto-training outlook, plus what is running."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from server.actions import estop_since
from server.outputs import AutoStatus, KernelInfo, RunView
from server.state import AppState
from server.tools import auto_status, kernel_info, run_view


class KernelRow(BaseModel):
    info: KernelInfo
    auto: AutoStatus
    trained: int
    active_run: RunView | None
    last_run: RunView | None


class Overview(BaseModel):
    kernels: list[KernelRow]
    estop_since: datetime | None
    quarantined: int


async def kernel_row(state: AppState, name: str) -> KernelRow:
    kernel = await state.store.kernels.get(name)
    info = await kernel_info(state, kernel)
    recent = await state.store.runs.recent(name, limit=1)
    last = recent[0] if recent else None
    active = await state.store.runs.active_for_kernel(name)
    return KernelRow(
        info=info,
        auto=await auto_status(state, kernel),
        trained=await state.store.experiences.count(name, "trained"),
        active_run=await run_view(state, active, events=0) if active else None,
        last_run=await run_view(state, last, events=0) if last else None,
    )


async def overview(state: AppState) -> Overview:
    return Overview(
        kernels=[await kernel_row(state, k.name) for k in await state.store.kernels.all()],
        estop_since=estop_since(state.layout),
        quarantined=await state.store.quarantine.count(),
    )
