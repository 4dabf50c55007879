"""Operator actions shared by the MCP tools, the dashboard and the CLI, so they can never disagree.

Rollback, cancel, breaker reset and the e-stop each live here once. Rollbacks are also written to the
kernel's history (`kernels/<name>/rollbacks.jsonl`), because runs record deploys and rejections but nothing
else records when, and by whom, a kernel was rolled back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import anyio
from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from server.outputs import AutoStatus, RollbackResult
from server.pickup import kernel_uri, run_uri
from server.state import AppState
from store.models import Run
from train_worker.deploy import KernelFiles
from train_worker.protocol import check_run_id, write_atomic
from train_worker.settings import Layout

log = logging.getLogger(__name__)

Via = Literal["mcp", "dashboard", "cli"]  # who acted: rollbacks come from the first two, the e-stop from all
ROLLBACK_LOG = "rollbacks.jsonl"


class ActionRefused(Exception):
    """The action cannot be done as asked; the message says why and what to do instead."""


class RollbackRecord(BaseModel):
    """One line of `kernels/<name>/rollbacks.jsonl`."""

    model_config = ConfigDict(extra="forbid")

    ts: AwareDatetime
    from_version: int | None
    to_version: int | None
    via: Via


def version_name(version: int | None) -> str:
    return "the bare base model" if version is None else f"v{version}"


async def rollback(state: AppState, kernel: str, version: int | None, via: Via) -> RollbackResult:
    """Serve an earlier version (None: the one before the current; 0: the bare base) and record it."""
    k = await state.store.kernels.get(kernel)
    now = state.store.db.clock.now()
    # The kernel lock can be held by a worker writing a deploy: wait for it off the event loop.
    target = await anyio.to_thread.run_sync(_switch_back, KernelFiles(state.layout, kernel), version, now, via)
    await state.store.versions.mark_deployed(kernel, target)
    await state.notifier.updated(kernel_uri(kernel))
    return RollbackResult(
        kernel=kernel,
        from_version=k.deployed_version,
        to_version=target,
        message=f"{kernel} now serves {version_name(target)}; the model host follows within a second",
    )


def _switch_back(files: KernelFiles, version: int | None, now: datetime, via: Via) -> int | None:
    """Under the kernel lock: point `current` at `version` and append the rollback to the kernel's history."""
    kernel = files.kernel
    with files.locked():
        current = files.current()
        on_disk = files.versions()
        if version is None:
            earlier = [v for v in on_disk if current is None or v < current]
            if not earlier:
                raise ActionRefused(
                    f"kernel {kernel!r} has no version before {version_name(current)} to roll back to; "
                    "pass version=0 to serve the bare base model"
                )
            target: int | None = earlier[-1]
        else:
            target = version or None
            if target is not None and target not in on_disk:
                kept = ", ".join(f"v{v}" for v in on_disk) or "none"
                raise ActionRefused(f"kernel {kernel!r} has no version v{target} on disk (kept: {kept})")
        files.switch(target)
        _append_rollback(
            files.root / ROLLBACK_LOG, RollbackRecord(ts=now, from_version=current, to_version=target, via=via)
        )
    return target


def _append_rollback(path: Path, record: RollbackRecord) -> None:
    # Rewritten whole under the kernel lock, so a reader never sees half a line.
    old = path.read_bytes() if path.exists() else b""
    write_atomic(path, old + record.model_dump_json().encode() + b"\n")


def rollback_history(layout: Layout, kernel: str) -> list[RollbackRecord]:
    """The kernel's rollbacks, oldest first; a line that does not parse is skipped with a warning."""
    path = KernelFiles(layout, kernel).root / ROLLBACK_LOG
    records: list[RollbackRecord] = []
    with contextlib.suppress(FileNotFoundError):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(RollbackRecord.model_validate(json.loads(line)))
            except (ValueError, ValidationError) as exc:
                log.warning("%s line %d skipped: %s", path, number, exc)
    return records


async def cancel(state: AppState, run_id: str) -> Run:
    """Cancel at once if no worker has the run (one whose worker is gone is ended here), otherwise the worker
    stops within seconds in any phase; a run whose deploy has committed cannot be cancelled."""
    run = await state.dispatcher.cancel(check_run_id(run_id))
    await state.notifier.updated(run_uri(run.id), kernel_uri(run.kernel))
    return run


async def reset_breaker(state: AppState, kernel: str) -> AutoStatus:
    """Failed runs before now stop counting; returns the outlook right after the reset, then starts an
    automatic run if one is now due."""
    from server.tools import auto_status  # the tools import this module: a top-level import would be a cycle

    status = await auto_status(state, await state.store.kernels.reset_breaker(kernel))
    await state.autotrainer.check_quietly(kernel)
    return status


def estop_on(layout: Layout, via: Via) -> bool:
    """Create the e-stop file (no run starts while it exists); False when it was already there."""
    if layout.estop.exists():
        return False
    layout.home.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    write_atomic(layout.estop, f"set {stamp} via {via}; no run starts until this file is removed\n".encode())
    log.warning("e-stop set (via %s): %s", via, layout.estop)
    return True


def estop_off(layout: Layout, via: Via) -> bool:
    """Remove the e-stop file; False when there was none."""
    try:
        os.unlink(layout.estop)
    except FileNotFoundError:
        return False
    log.warning("e-stop removed (via %s): %s", via, layout.estop)
    return True


def estop_since(layout: Layout) -> datetime | None:
    """When the e-stop file was created, or None when training is allowed."""
    try:
        return datetime.fromtimestamp(layout.estop.stat().st_mtime).astimezone()
    except FileNotFoundError:
        return None
