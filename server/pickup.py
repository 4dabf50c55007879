"""Bringing the worker's files into the store: progress events as they grow, results when they land."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

import train_worker.lifecycle as lifecycle
from server.dispatch import Dispatcher
from store import Store
from store.errors import NotFound
from store.models import ACTIVE_RUN_STATUSES, Run
from train_worker.deploy import DeployError, KernelFiles
from train_worker.lifecycle import RunFiles, may_move
from train_worker.protocol import (
    PHASE_STATUS,
    ProtocolError,
    RunResult,
    quarantine,
    read_events,
    read_model,
    write_atomic,
)
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
        self._recorded: set[str] = set()  # quarantined files already in the store
        self._loaded_recorded = False

    async def sweep(self) -> None:
        """One pass over everything the worker may have written since the last pass."""
        async with self._lock:
            await self.mirror_events()
            await self.collect_results()
            await self.record_quarantines()
            await self.reconcile_served()
        await self._dispatcher.reconcile()

    async def mirror_events(self) -> None:
        for run in await self._store.runs.with_status(*ACTIVE_RUN_STATUSES):
            await self._mirror(run)

    async def _mirror(self, run: Run) -> Run:
        path = self._layout.run_dir(run.id) / "events.jsonl"
        events, offset, problems = await anyio.to_thread.run_sync(read_events, path, run.events_offset)
        for problem in problems:
            log.warning("run %s: skipped a malformed progress event: %s", run.id, problem)
            await self._record_problem(path, f"run {run.id}: a malformed progress event was skipped: {problem}")
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
            await self._refuse(path, str(exc))
            return
        if path.stem != result.run_id:
            await self._refuse(path, f"the file is named for run {path.stem} but holds the result of {result.run_id}")
            return
        run = await self._store.runs.find(result.run_id)
        if run is None:
            await self._quarantine(path, f"result for unknown run {result.run_id}")
            return
        if run.kernel != result.kernel:
            await self._refuse(path, f"result names kernel {result.kernel} but run {run.id} is for {run.kernel}")
            return
        if run.active and not may_move(run.status, result.status, "worker"):
            await self._refuse(path, f"a {result.status} result cannot end a run that is still {run.status}")
            return
        # Mirror the last events first, so the run's history is complete before it is closed.
        await self._mirror(run)
        try:
            finished = await self._dispatcher.record(result)
        except (ValueError, NotFound) as exc:
            await self._refuse(path, f"result could not be recorded: {exc}")
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

    async def _refuse(self, path: Path, reason: str) -> None:
        """Quarantine a result file; the run it names gets its own copy re-delivered, or ends failed."""
        stored = await self._quarantine(path, reason)
        try:
            files = RunFiles(self._layout, path.stem)
        except ValueError:
            return
        run = await self._store.runs.find(files.run_id)
        if run is None or not run.active:
            return
        original = await anyio.to_thread.run_sync(_valid_result, files.result, files.run_id)
        if original is not None and original.kernel == run.kernel:
            # The inbox copy was damaged but the worker's own result.json is sound: deliver it again.
            await anyio.to_thread.run_sync(lifecycle.deliver, self._layout, files.run_id)
            return
        if files.claimed() and original is None and files.result.exists():
            # Both copies torn by a crash: the run is still claimed, so a worker resumes it and ends it again
            # (a committed deploy is completed from deploy.json).
            await anyio.to_thread.run_sync(lifecycle.rearm, self._layout, files.run_id)
            log.warning("run %s: its result.json is torn too; it is resumed by the next worker", run.id)
            return
        ended = await self._store.runs.finish(
            run.id, "failed", error=f"the worker's result was refused and quarantined as {stored.name}: {reason}"
        )
        log.error("run %s failed: its result was refused (%s)", run.id, reason)
        await self._notify(run_uri(run.id), kernel_uri(run.kernel))
        if self._on_finished is not None:
            await self._on_finished(ended)

    async def _quarantine(self, path: Path, reason: str) -> Path:
        stored = quarantine(path, self._layout.quarantine, reason)
        await self._store.quarantine.record(str(path), str(stored), reason)
        self._recorded.add(str(stored))
        log.error("quarantined %s: %s", path.name, reason)
        return stored

    async def _record_problem(self, path: Path, reason: str) -> None:
        """A problem inside a file that stays in use (a bad event line): its reason is quarantined and recorded."""
        note = (
            self._layout.quarantine / f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}-{path.parent.name}-{path.name}.reason.txt"
        )
        await anyio.to_thread.run_sync(write_atomic, note, reason.encode() + b"\n")
        await self._store.quarantine.record(str(path), str(note), reason)
        self._recorded.add(str(note))

    async def record_quarantines(self) -> None:
        """Files the worker quarantined (it has no store) are recorded here, each once."""
        if not self._loaded_recorded:
            self._recorded |= await self._store.quarantine.known()
            self._loaded_recorded = True
        reasons = await anyio.to_thread.run_sync(_reason_files, self._layout.quarantine)
        for note in reasons:
            stored = note.with_name(note.name.removesuffix(".reason.txt"))
            key = str(stored) if stored.exists() else str(note)
            if key in self._recorded or str(note) in self._recorded:
                continue
            try:
                reason = note.read_text(errors="replace").strip()
            except OSError:
                continue
            original = stored.name.split("-", 1)[-1]
            await self._store.quarantine.record(original, key, reason)
            self._recorded.add(key)
            log.warning("recorded a file the worker quarantined: %s (%s)", stored.name, reason)

    async def reconcile_served(self) -> None:
        """`current` is what serves; the store's deployed versions follow it (a lost result, a crashed rollback)."""
        # A run in flight switches `current` just before it writes its result, which records the version; a
        # sweep in between is not a lost result. A run that dies there ends (resumed by the next worker, or
        # cancelled), and the sweep after that reconciles its kernel.
        in_flight = {run.kernel for run in await self._store.runs.with_status("running", "evaluating")}
        for kernel in await self._store.kernels.all():
            if kernel.name in in_flight:
                continue
            files = KernelFiles(self._layout, kernel.name)
            try:
                serving = await anyio.to_thread.run_sync(files.current)
            except DeployError as exc:
                log.error("kernel %s: %s", kernel.name, exc)
                continue
            if serving == kernel.deployed_version:
                continue
            path = run_id = None
            if serving is not None:
                path = str(files.version_dir(serving).relative_to(self._layout.home))
                with contextlib.suppress(ProtocolError):
                    run_id = (await anyio.to_thread.run_sync(files.meta, serving)).run_id
            log.warning(
                "kernel %s: the store said v%s is deployed but %s serves; the store follows current",
                kernel.name,
                kernel.deployed_version,
                f"v{serving}" if serving is not None else "the bare base",
            )
            await self._store.versions.mark_deployed(kernel.name, serving, path=path, run_id=run_id)
            await self._notify(kernel_uri(kernel.name))


def _valid_result(path: Path, run_id: str) -> RunResult | None:
    try:
        result = read_model(path, RunResult)
    except ProtocolError:
        return None
    return result if result.run_id == run_id else None


def _reason_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.reason.txt")) if folder.is_dir() else []


class Watcher:
    """A watchdog observer that wakes the sweep loop when the worker touches its files."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._wake = anyio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def run(self, pickup: Pickup, *, interval: float = 5.0) -> None:
        """Sweep at start (results that landed while we were down), on every file event, and every `interval`."""
        self._loop = asyncio.get_running_loop()
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
            self._loop = None
            # Off the loop: stopping waits for the observer's thread, which may be delivering an event.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(observer.stop)
                await anyio.to_thread.run_sync(observer.join, 2.0)

    def _poke(self) -> None:
        """Called on watchdog's thread: schedule the wake-up and return, never wait for the loop."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: we are shutting down
                loop.call_soon_threadsafe(self._set_wake)

    def _set_wake(self) -> None:
        self._wake.set()


class _Handler(FileSystemEventHandler):
    def __init__(self, poke: Callable[[], None]) -> None:
        self._poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        name = Path(str(event.dest_path or event.src_path)).name
        if name.endswith((".json", ".jsonl")):
            self._poke()
