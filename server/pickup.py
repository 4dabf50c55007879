"""Bringing the worker's files into the store: progress events as they grow, results when they land."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from server.dispatch import Dispatcher
from store import Store
from store.errors import NotFound
from store.models import ACTIVE_RUN_STATUSES, Run
from train_worker.protocol import PHASE_STATUS, ProtocolError, RunResult, quarantine, read_events, read_model
from train_worker.settings import Layout

log = logging.getLogger(__name__)

Notify = Callable[..., Awaitable[None]]
OnFinished = Callable[[Run], Awaitable[None]]


def run_uri(run_id: str) -> str:
    return f"engrain://runs/{run_id}"


def kernel_uri(name: str) -> str:
    return f"engrain://kernels/{name}"


class Pickup:
    """Mirrors events.jsonl into run_events and records each result file exactly once."""

    def __init__(
        self,
        store: Store,
        layout: Layout,
        dispatcher: Dispatcher,
        notify: Notify,
        on_finished: OnFinished | None = None,
    ) -> None:
        self._store = store
        self._layout = layout
        self._dispatcher = dispatcher
        self._notify = notify
        self._on_finished = on_finished
        self._lock = anyio.Lock()

    async def sweep(self) -> None:
        """One pass over everything the worker may have written since the last pass."""
        async with self._lock:
            await self.mirror_events()
            await self.collect_results()
        await self._dispatcher.reconcile()

    async def mirror_events(self) -> None:
        for run in await self._store.runs.with_status(*ACTIVE_RUN_STATUSES):
            await self._mirror(run)

    async def _mirror(self, run: Run) -> Run:
        path = self._layout.run_dir(run.id) / "events.jsonl"
        events, offset, problems = await anyio.to_thread.run_sync(read_events, path, run.events_offset)
        for problem in problems:
            log.warning("run %s: skipped a malformed progress event: %s", run.id, problem)
        if offset == run.events_offset:
            return run
        rows: list[dict[str, Any]] = []
        for event in events:
            if event.run_id != run.id:
                log.warning("run %s: skipped an event that names run %s", run.id, event.run_id)
                continue
            row = event.model_dump()
            row["run_status"] = PHASE_STATUS.get(event.phase)
            row["progress"] = event.progress
            rows.append(row)
        updated = await self._store.runs.record_events(run.id, rows, offset)
        if updated.status != run.status:
            await self._notify(run_uri(run.id), kernel_uri(run.kernel))
        return updated

    async def collect_results(self) -> None:
        directory = self._layout.results
        if not directory.is_dir():
            return
        for path in sorted(directory.glob("*.json")):
            await self._collect(path)

    async def _collect(self, path: Path) -> None:
        try:
            result = await anyio.to_thread.run_sync(read_model, path, RunResult)
        except ProtocolError as exc:
            await self._quarantine(path, str(exc))
            return
        run = await self._store.runs.find(result.run_id)
        if run is None:
            await self._quarantine(path, f"result for unknown run {result.run_id}")
            return
        if run.kernel != result.kernel:
            await self._quarantine(path, f"result names kernel {result.kernel} but run {run.id} is for {run.kernel}")
            return
        # Mirror the last events first, so the run's history is complete before it is closed.
        await self._mirror(run)
        try:
            finished = await self._store.runs.finish(
                result.run_id,
                result.status,
                finished_at=result.finished_at,
                error=result.error,
                metrics=result.metrics,
                gates=[g.model_dump() for g in result.gates],
                new_version=result.version,
                version_path=result.version_path,
                losses={item.experience_id: item.loss for item in result.losses},
            )
        except (ValueError, NotFound) as exc:
            await self._quarantine(path, f"result could not be recorded: {exc}")
            return
        if result.pruned_versions:
            await self._store.versions.mark_pruned(run.kernel, result.pruned_versions)
        try:
            os.replace(path, self._layout.archive / path.name)
        except FileNotFoundError:
            return  # another server process recorded it too and archived it first; it runs the follow-ups
        log.info("run %s ended: %s", result.run_id, result.status)
        await self._notify(run_uri(run.id), kernel_uri(run.kernel))
        if self._on_finished is not None:
            await self._on_finished(finished)

    async def _quarantine(self, path: Path, reason: str) -> None:
        try:
            stored = quarantine(path, self._layout.quarantine, reason)
        except FileNotFoundError:
            return  # another server process quarantined it first
        await self._store.quarantine.record(str(path), str(stored), reason)
        log.error("quarantined %s: %s", path.name, reason)


class Watcher:
    """A watchdog observer that wakes the sweep loop when the worker touches its files."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._wake = anyio.Event()
        self._token: anyio.lowlevel.EventLoopToken | None = None

    async def run(self, pickup: Pickup, *, interval: float = 5.0) -> None:
        """Sweep at start (results that landed while we were down), on every file event, and every `interval`."""
        self._token = anyio.lowlevel.current_token()
        observer = Observer()
        handler = _Handler(self._poke)
        for folder in (self._layout.requests, self._layout.results, self._layout.runs):
            observer.schedule(handler, str(folder), recursive=folder == self._layout.runs)
        observer.daemon = True
        observer.start()
        try:
            while True:
                try:
                    await pickup.sweep()
                except Exception:
                    log.exception("result pickup failed; retrying on the next event")
                with anyio.move_on_after(interval):
                    await self._wake.wait()
                self._wake = anyio.Event()
                # Let a burst of file events settle into one sweep.
                await anyio.sleep(0.05)
        finally:
            observer.stop()
            await anyio.to_thread.run_sync(observer.join, 2.0)

    def _poke(self) -> None:
        if self._token is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: we are shutting down
                anyio.from_thread.run_sync(self._wake.set, token=self._token)


class _Handler(FileSystemEventHandler):
    def __init__(self, poke: Callable[[], None]) -> None:
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        name = Path(str(event.dest_path or event.src_path)).name
        if name.endswith((".json", ".jsonl")):
            self._poke()
