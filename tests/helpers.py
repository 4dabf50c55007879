"""Small helpers for tests that play the worker's part by hand."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from train_worker.protocol import (
    ProgressEvent,
    RunResult,
    TrainRequest,
    VersionMeta,
    append_event,
    read_model,
    write_model,
)
from train_worker.settings import Layout


def claim(layout: Layout) -> TrainRequest:
    """Claim pending.json the way the worker does: an atomic rename into the run folder."""
    request = read_model(layout.pending, TrainRequest)
    os.replace(layout.pending, layout.run_dir(request.run_id) / "request.json")
    return request


def event(layout: Layout, run_id: str, seq: int, phase: str, **fields: Any) -> None:
    append_event(
        layout.run_dir(run_id) / "events.jsonl",
        ProgressEvent.model_validate({"run_id": run_id, "seq": seq, "ts": datetime.now(UTC), "phase": phase, **fields}),
    )


def result(layout: Layout, run_id: str, kernel: str, status: str, **fields: Any) -> Path:
    path = layout.results / f"{run_id}.json"
    write_model(
        path,
        RunResult.model_validate(
            {"run_id": run_id, "kernel": kernel, "status": status, "finished_at": datetime.now(UTC), **fields}
        ),
    )
    return path


def fake_version(layout: Layout, kernel: str, version: int, run_id: str) -> Path:
    """A version folder as the worker leaves it (no real adapter inside)."""
    folder = layout.kernel_dir(kernel) / "versions" / f"v{version}"
    folder.mkdir(parents=True)
    write_model(
        folder / "meta.json",
        VersionMeta(
            kernel=kernel,
            version=version,
            run_id=run_id,
            parent_version=version - 1 or None,
            base_model="embedded",
            created_at=datetime.now(UTC),
        ),
    )
    return folder


async def eventually(check: Callable[[], Any], within: float = 30.0) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; the server reacts to files asynchronously."""
    with anyio.fail_after(within):
        while True:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await anyio.sleep(0.05)


async def picked_up(layout: Layout, run_id: str) -> None:
    """Wait until the server has recorded and archived the run's result file."""
    path = layout.results / f"{run_id}.json"
    await eventually(lambda: not path.exists())
