"""Turning a training wish into files, and keeping the store and the files in step (train_worker/lifecycle.py).

One run folder per run, at most one `pending.json` at a time. Requests, cancels and reconciles hold a
cross-process lock (`locks/dispatch.lock`) as well as this server's own, so two servers on one home
take turns; the store's unique index allows one active run per kernel besides.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Literal

import anyio
from pydantic import ValidationError

import train_worker.lifecycle as lifecycle
from server.kernel_config import KernelConfig
from store import Store
from store.errors import Conflict, StoreError
from store.models import Experience, Kernel, Run, RunTrigger
from train_worker.deploy import KernelFiles
from train_worker.lifecycle import RunFiles
from train_worker.locks import dispatch_lock
from train_worker.protocol import (
    BatchItem,
    BatchManifest,
    RunResult,
    TrainRequest,
    jsonl_bytes,
    new_run_id,
    write_atomic,
    write_model,
)
from train_worker.settings import Layout

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 60.0
MAX_REWRITES = 3  # a request that keeps vanishing (refused by the worker) ends its run instead of looping


class NothingToTrain(Exception):
    pass


class Busy(StoreError):
    """Another server held the home's dispatch lock for too long."""


class Dispatcher:
    """Creates runs, writes their request files when the slot is free, and takes requests back."""

    def __init__(self, store: Store, layout: Layout) -> None:
        self._store = store
        self._layout = layout
        self._lock = anyio.Lock()
        self._home_lock = dispatch_lock(layout.locks)
        self._rewrites: dict[str, int] = {}

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """This server's lock, then the home's: one server at a time moves runs."""
        async with self._lock:
            deadline = anyio.current_time() + LOCK_TIMEOUT_S
            while not self._home_lock.acquire():
                if anyio.current_time() > deadline:
                    raise Busy(
                        f"another engrain server on {self._layout.home} held the dispatch lock for over "
                        f"{LOCK_TIMEOUT_S:.0f} s (pid {self._home_lock.holder()}); try again"
                    )
                await anyio.sleep(0.01)
            try:
                yield
            finally:
                self._home_lock.release()

    async def request(self, kernel: str, trigger: RunTrigger = "manual") -> tuple[Run, bool]:
        """Start (or join) a run for `kernel`: (run, True) when an active run already existed."""
        async with self.exclusive():
            active = await self._store.runs.active_for_kernel(kernel)
            if active is not None:
                return active, True
            if await self._store.experiences.count_untrained(kernel) == 0:
                raise NothingToTrain(
                    f"kernel {kernel!r} has no untrained experiences; record some with record_experience first"
                )
            k = await self._store.kernels.get(kernel)
            try:
                run = await self._store.runs.create(
                    new_run_id(self._store.db.clock.now()), kernel, trigger, k.deployed_version
                )
            except Conflict:
                active = await self._store.runs.active_for_kernel(kernel)
                if active is None:
                    raise
                return active, True
            await self._promote_locked()
            return await self._store.runs.get(run.id), False

    async def _promote_locked(self) -> None:
        """Write the oldest queued run's request if `pending.json` is free (never while the e-stop exists)."""
        while not self._layout.pending.exists() and not lifecycle.estopped(self._layout):
            queued = await self._store.runs.with_status("queued")
            if not queued:
                return
            run = queued[0]
            try:
                await self._write_request(run)
            except NothingToTrain as exc:
                await self._store.runs.finish(run.id, "cancelled", error=str(exc))
                continue
            except BadRequest as exc:
                await self._store.runs.finish(run.id, "failed", error=str(exc))
                continue
            return

    async def _write_request(self, run: Run) -> None:
        kernel = await self._store.kernels.get(run.kernel)
        config = KernelConfig.model_validate(kernel.config)
        new = await self._store.experiences.untrained(kernel.name, config.max_new_per_run)
        if not new:
            raise NothingToTrain(f"kernel {kernel.name!r} had no untrained experiences left when its turn came")
        request = _train_request(run, kernel, config, self._store.db.clock.now())
        replay = await self._store.experiences.replay_pool(kernel.name, config.replay_pool_max)
        items = [_batch_item(e, "new") for e in new] + [_batch_item(e, "replay") for e in replay]
        run_dir = self._layout.run_dir(run.id)
        await anyio.to_thread.run_sync(_write_batch, run_dir, run.id, kernel.name, items, self._store.db.clock.now())
        # The store learns which experiences the run carries before the worker can see the request,
        # so a crash in between leaves a 'requested' run that reconcile() re-announces.
        await self._store.runs.mark_requested(run.id, [(e.id, "new") for e in new] + [(e.id, "replay") for e in replay])
        await anyio.to_thread.run_sync(write_model, self._layout.pending, request)
        log.info("requested run %s for kernel %s: %d new, %d replay", run.id, kernel.name, len(new), len(replay))

    async def reconcile(self) -> None:
        """Bring the files in line with the store, for every crash point the lifecycle names."""
        async with self.exclusive():
            await self._withdraw_stale_request()
            for run in await self._store.runs.with_status("requested", "running", "evaluating"):
                seen = await anyio.to_thread.run_sync(lifecycle.observe, self._layout, run.id)
                if seen == "unmarked":
                    log.warning("run %s is claimed but has no active marker; re-arming it", run.id)
                    await anyio.to_thread.run_sync(lifecycle.rearm, self._layout, run.id)
                elif seen == "ended":
                    await anyio.to_thread.run_sync(lifecycle.deliver, self._layout, run.id)
                elif seen == "lost":
                    await self._recover_lost(run)
            await self._promote_locked()

    async def _withdraw_stale_request(self) -> None:
        """A `pending.json` for a run that is no longer waiting (cancelled by another server) is taken back."""
        pending = lifecycle.pending_run_id(self._layout)
        if pending is None:
            return
        run = await self._store.runs.find(pending)
        stale = run is None or run.status != "requested"
        if stale and await anyio.to_thread.run_sync(lifecycle.withdraw, self._layout, pending):
            log.warning("withdrew pending.json for run %s: the store has it as %s", pending, run and run.status)

    async def _recover_lost(self, run: Run) -> None:
        """A requested run whose request file is gone (never written, or refused): write it again, bounded."""
        if run.status != "requested":
            await self._store.runs.finish(run.id, "failed", error="the run's files are gone from its home folder")
            return
        if self._layout.pending.exists() or lifecycle.estopped(self._layout):
            return  # another run holds the slot, or nothing starts: re-announced when that changes
        tries = self._rewrites.get(run.id, 0) + 1
        if tries > MAX_REWRITES:
            await self._store.runs.finish(
                run.id,
                "failed",
                error=f"its request file disappeared {MAX_REWRITES} times without being claimed (the worker "
                f"refused it: see {self._layout.quarantine})",
            )
            return
        self._rewrites[run.id] = tries
        log.warning("run %s was requested but its request file is missing; writing it again", run.id)
        kernel = await self._store.kernels.get(run.kernel)
        try:
            request = _train_request(
                run, kernel, KernelConfig.model_validate(kernel.config), self._store.db.clock.now()
            )
        except BadRequest as exc:
            await self._store.runs.finish(run.id, "failed", error=str(exc))
            return
        await anyio.to_thread.run_sync(write_model, self._layout.pending, request)

    async def cancel(self, run_id: str) -> Run:
        """Cancel at once if no worker has the run; otherwise ask the worker, unless its deploy has committed."""
        async with self.exclusive():
            run = await self._store.runs.get(run_id)
            if not run.active:
                raise Conflict(f"run {run.id} already ended as {run.status}; nothing to cancel")
            if run.status == "queued":
                return await self._store.runs.finish(run.id, "cancelled", error="cancelled before it was requested")
            if run.status == "requested" and await anyio.to_thread.run_sync(lifecycle.withdraw, self._layout, run.id):
                done = await self._store.runs.finish(run.id, "cancelled", error="cancelled before training began")
                await self._promote_locked()
                return done
            seen = await anyio.to_thread.run_sync(lifecycle.observe, self._layout, run.id)
            if seen == "lost":
                return await self._store.runs.finish(run.id, "cancelled", error="cancelled before a worker took it")
            if seen in ("ended", "delivered", "recorded"):
                return run  # it ended meanwhile: the result says how, and is recorded on the next sweep
            forced = await anyio.to_thread.run_sync(
                lifecycle.force_finish,
                self._layout,
                run.id,
                run.kernel,
                "cancelled",
                "cancelled while no worker was running it (force-finished by the server)",
            )
            if forced is not None:
                log.warning("run %s had no live worker; force-finished it as cancelled", run.id)
                return await self.record(forced)
            refusal = await anyio.to_thread.run_sync(_ask_worker_to_cancel, self._layout, run.id, run.kernel)
            if refusal is not None:
                raise Conflict(refusal)
            return await self._store.runs.request_cancel(run.id)

    async def record(self, result: RunResult) -> Run:
        """Close a run in the store from its result (idempotent: a run already ended is left as it is)."""
        return await self._store.runs.finish(
            result.run_id,
            result.status,
            finished_at=result.finished_at,
            error=result.error,
            metrics=result.metrics,
            gates=[g.model_dump() for g in result.gates],
            new_version=result.version,
            version_path=result.version_path,
            losses={item.experience_id: item.loss for item in result.losses},
            lost=[item.model_dump(mode="json") for item in result.lost],
        )


class BadRequest(StoreError):
    """The kernel's stored configuration cannot make a valid request."""


def _ask_worker_to_cancel(layout: Layout, run_id: str, kernel: str) -> str | None:
    """Write the cancel marker under the kernel lock, unless the run's deploy has committed (the reason)."""
    files = RunFiles(layout, run_id)
    with KernelFiles(layout, kernel).locked():
        if files.deploy_committed():
            return (
                f"run {run_id} is already deploying its new version and can no longer be cancelled; once it "
                f"ends, rollback_kernel(kernel={kernel!r}) serves the previous version again"
            )
        write_atomic(files.cancel, b"cancel requested\n")
    return None


def _write_batch(run_dir: Path, run_id: str, kernel: str, items: list[BatchItem], now: datetime) -> None:
    batch = jsonl_bytes(items)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "batch.jsonl", batch)
    n_new = sum(1 for i in items if i.role == "new")
    manifest = BatchManifest(
        run_id=run_id,
        kernel=kernel,
        created_at=now,
        n_new=n_new,
        n_replay=len(items) - n_new,
        sha256=hashlib.sha256(batch).hexdigest(),
    )
    write_model(run_dir / "manifest.json", manifest)


def _train_request(run: Run, kernel: Kernel, config: KernelConfig, now: datetime) -> TrainRequest:
    """The run's request, proven to survive its own round trip through JSON before anyone writes it."""
    try:
        request = TrainRequest(
            run_id=run.id,
            kernel=kernel.name,
            base_model=kernel.base_model,
            base_version=kernel.deployed_version,
            settings=config.train,
            gates=config.gates,
            output_schema=config.output_schema,
            must_keep=config.must_keep,
            requested_at=now,
        )
        TrainRequest.model_validate_json(request.model_dump_json())
    except ValidationError as exc:
        raise BadRequest(
            f"kernel {kernel.name!r}'s configuration cannot make a training request: {exc.errors()[0]['msg']} "
            f"at {'.'.join(map(str, exc.errors()[0]['loc']))}; fix it with configure_kernel"
        ) from exc
    return request


def _batch_item(e: Experience, role: Literal["new", "replay"]) -> BatchItem:
    return BatchItem(
        id=str(e.id),
        experience_id=e.id,
        role=role,
        prompt=e.prompt,
        response=e.response,
        system=e.system,
        key_answer=e.key_answer,
        paraphrases=e.paraphrases,
        loss=e.last_loss,
    )
