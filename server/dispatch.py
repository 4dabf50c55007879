"""Turning a training wish into files: one run folder per run, at most one `pending.json` at a time."""

from __future__ import annotations

import hashlib
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Literal

import anyio

from server.kernel_config import KernelConfig
from store import Store
from store.models import Experience, Kernel, Run, RunTrigger
from train_worker.protocol import (
    CANCEL_MARKER,
    BatchItem,
    BatchManifest,
    ProtocolError,
    TrainRequest,
    jsonl_bytes,
    new_run_id,
    read_model,
    write_atomic,
    write_model,
)
from train_worker.settings import Layout

log = logging.getLogger(__name__)


class NothingToTrain(Exception):
    pass


class Dispatcher:
    """Creates runs, writes their request files when the slot is free, and takes requests back."""

    def __init__(self, store: Store, layout: Layout) -> None:
        self._store = store
        self._layout = layout
        self._lock = anyio.Lock()

    async def request(self, kernel: str, trigger: RunTrigger = "manual") -> tuple[Run, bool]:
        """Start (or join) a run for `kernel`: (run, True) when an active run already existed."""
        async with self._lock:
            active = await self._store.runs.active_for_kernel(kernel)
            if active is not None:
                return active, True
            if await self._store.experiences.count_untrained(kernel) == 0:
                raise NothingToTrain(
                    f"kernel {kernel!r} has no untrained experiences; record some with record_experience first"
                )
            k = await self._store.kernels.get(kernel)
            run_id = new_run_id(self._store.db.clock.now())
            run = await self._store.runs.create(run_id, kernel, trigger, k.deployed_version)
            await self._promote_locked()
            return await self._store.runs.get(run.id), False

    async def _promote_locked(self) -> None:
        """Write the oldest queued run's request if `pending.json` is free."""
        while not self._layout.pending.exists():
            queued = await self._store.runs.with_status("queued")
            if not queued:
                return
            run = queued[0]
            try:
                await self._write_request(run)
            except NothingToTrain as exc:
                await self._store.runs.finish(run.id, "cancelled", error=str(exc))
                continue
            return

    async def _write_request(self, run: Run) -> None:
        kernel = await self._store.kernels.get(run.kernel)
        config = KernelConfig.model_validate(kernel.config)
        new = await self._store.experiences.untrained(kernel.name, config.max_new_per_run)
        if not new:
            raise NothingToTrain(f"kernel {kernel.name!r} had no untrained experiences left when its turn came")
        replay = await self._store.experiences.replay_pool(kernel.name, config.replay_pool_max)
        items = [_batch_item(e, "new") for e in new] + [_batch_item(e, "replay") for e in replay]
        run_dir = self._layout.run_dir(run.id)
        await anyio.to_thread.run_sync(_write_batch, run_dir, run.id, kernel.name, items, self._store.db.clock.now())
        # The store learns which experiences the run carries before the worker can see the request,
        # so a crash in between leaves a 'requested' run that reconcile() re-announces.
        await self._store.runs.mark_requested(run.id, [(e.id, "new") for e in new] + [(e.id, "replay") for e in replay])
        request = _train_request(run, kernel, config, self._store.db.clock.now())
        await anyio.to_thread.run_sync(write_model, self._layout.pending, request)
        log.info("requested run %s for kernel %s: %d new, %d replay", run.id, kernel.name, len(new), len(replay))

    async def reconcile(self) -> None:
        """Re-announce requested runs whose request file never reached the worker, then fill the slot.

        That covers a crash between recording a request and writing its file, and a request file the
        worker refused and quarantined: the store still knows the run, so it is written afresh.
        """
        async with self._lock:
            for run in await self._store.runs.with_status("requested"):
                # pending.json before the run folder: the worker's claim renames one into the other.
                if self._pending_run_id() == run.id or (self._layout.run_dir(run.id) / "request.json").exists():
                    continue
                if self._layout.pending.exists():
                    continue  # another run holds the slot; this one is re-announced when it frees
                log.warning("run %s was requested but its request file is missing; writing it again", run.id)
                await self._rewrite(run)
            await self._promote_locked()

    async def _rewrite(self, run: Run) -> None:
        kernel = await self._store.kernels.get(run.kernel)
        config = KernelConfig.model_validate(kernel.config)
        write_model(self._layout.pending, _train_request(run, kernel, config, self._store.db.clock.now()))

    async def cancel(self, run: Run) -> Run:
        """Cancel at once if the worker has not claimed the run; otherwise ask the worker to stop."""
        async with self._lock:
            if run.status == "queued":
                return await self._store.runs.finish(run.id, "cancelled", error="cancelled before it was requested")
            if run.status == "requested" and self._pending_run_id() == run.id:
                try:
                    # Whoever renames pending.json first owns it: the worker to claim, or us to withdraw.
                    os.replace(self._layout.pending, self._layout.run_dir(run.id) / "request.withdrawn.json")
                except FileNotFoundError:
                    pass
                else:
                    done = await self._store.runs.finish(run.id, "cancelled", error="cancelled before training began")
                    await self._promote_locked()
                    return done
            await self._store.runs.request_cancel(run.id)
            write_atomic(self._layout.run_dir(run.id) / CANCEL_MARKER, b"cancel requested\n")
            return await self._store.runs.get(run.id)

    def _pending_run_id(self) -> str | None:
        try:
            return read_model(self._layout.pending, TrainRequest).run_id
        except ProtocolError:
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
    return TrainRequest(
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
