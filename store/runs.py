"""The runs, run_items and run_events tables: a training run's lifecycle and progress."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from store.clock import to_iso
from store.db import Database
from store.errors import Conflict, NotFound
from store.models import ACTIVE_RUN_STATUSES, FINAL_RUN_STATUSES, Run, RunEvent, RunStatus, RunTrigger

_ACTIVE = "('" + "', '".join(ACTIVE_RUN_STATUSES) + "')"

# Progress moves a run forward through these; it never moves a run backwards or out of a final state.
_ORDER: dict[RunStatus, int] = {"queued": 0, "requested": 1, "running": 2, "evaluating": 3}


class Runs:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, run_id: str, kernel: str, trigger: RunTrigger, base_version: int | None) -> Run:
        """A queued run; `Conflict` when the kernel already has an active one (a unique index holds that)."""
        now = self._db.clock.iso()
        try:
            async with self._db.transaction() as tx:
                await tx.execute(
                    "INSERT INTO runs (id, kernel, status, trigger, base_version, phase, created_at, updated_at)"
                    " VALUES (?, ?, 'queued', ?, ?, 'queued', ?, ?)",
                    (run_id, kernel, trigger, base_version, now, now),
                )
        except sqlite3.IntegrityError as exc:
            if "runs.kernel" not in str(exc):
                raise
            raise Conflict(f"kernel {kernel!r} already has an active run; follow it with training_status") from exc
        return await self.get(run_id)

    async def find(self, run_id: str) -> Run | None:
        row = await self._db.fetchone("SELECT * FROM runs WHERE id = ?", (run_id,))
        return None if row is None else Run.from_row(row)

    async def get(self, run_id: str) -> Run:
        run = await self.find(run_id)
        if run is None:
            raise NotFound(f"no run with run_id {run_id!r}; list a kernel's runs with training_status(kernel=...)")
        return run

    async def active_for_kernel(self, kernel: str) -> Run | None:
        row = await self._db.fetchone(
            f"SELECT * FROM runs WHERE kernel = ? AND status IN {_ACTIVE} ORDER BY created_at LIMIT 1",
            (kernel,),
        )
        return None if row is None else Run.from_row(row)

    async def with_status(self, *statuses: RunStatus) -> list[Run]:
        marks = ",".join("?" * len(statuses))
        rows = await self._db.fetchall(
            f"SELECT * FROM runs WHERE status IN ({marks}) ORDER BY created_at, id", statuses
        )
        return [Run.from_row(r) for r in rows]

    async def recent(self, kernel: str, limit: int = 20) -> list[Run]:
        rows = await self._db.fetchall(
            "SELECT * FROM runs WHERE kernel = ? ORDER BY created_at DESC, id DESC LIMIT ?", (kernel, limit)
        )
        return [Run.from_row(r) for r in rows]

    async def latest(self, limit: int = 50) -> list[Run]:
        """Every kernel's runs, newest first."""
        rows = await self._db.fetchall("SELECT * FROM runs ORDER BY created_at DESC, id DESC LIMIT ?", (limit,))
        return [Run.from_row(r) for r in rows]

    async def recent_final(self, kernel: str, limit: int) -> list[Run]:
        """The kernel's latest finished runs, newest first."""
        marks = ",".join("?" * len(FINAL_RUN_STATUSES))
        rows = await self._db.fetchall(
            f"SELECT * FROM runs WHERE kernel = ? AND status IN ({marks}) ORDER BY finished_at DESC, id DESC LIMIT ?",
            (kernel, *FINAL_RUN_STATUSES, limit),
        )
        return [Run.from_row(r) for r in rows]

    async def mark_requested(self, run_id: str, items: Sequence[tuple[int, Literal["new", "replay"]]]) -> Run:
        """The request file is written: record which experiences it carries."""
        now = self._db.clock.iso()
        n_new = sum(1 for _, role in items if role == "new")
        async with self._db.transaction() as tx:
            await tx.executemany(
                "INSERT OR IGNORE INTO run_items (run_id, experience_id, role) VALUES (?, ?, ?)",
                [(run_id, exp_id, role) for exp_id, role in items],
            )
            await tx.execute(
                "UPDATE runs SET status = 'requested', phase = 'requested', n_new = ?, n_replay = ?,"
                " requested_at = ?, updated_at = ? WHERE id = ? AND status = 'queued'",
                (n_new, len(items) - n_new, now, now, run_id),
            )
        return await self.get(run_id)

    async def item_ids(self, run_id: str, role: Literal["new", "replay"]) -> list[int]:
        rows = await self._db.fetchall(
            "SELECT experience_id FROM run_items WHERE run_id = ? AND role = ? ORDER BY experience_id",
            (run_id, role),
        )
        return [int(r[0]) for r in rows]

    async def record_events(self, run_id: str, events: Sequence[Mapping[str, Any]], new_offset: int) -> Run:
        """Mirror progress events from the run's events.jsonl and advance the run's live fields."""
        async with self._db.transaction() as tx:
            async with tx.execute("SELECT status FROM runs WHERE id = ?", (run_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no run with id {run_id!r}")
            status: RunStatus = row[0]
            await tx.executemany(
                "INSERT OR IGNORE INTO run_events (run_id, seq, ts, phase, step, total_steps, epoch, loss,"
                " tokens_per_s, eta_s, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        run_id, e["seq"], to_iso(e["ts"]), e["phase"], e.get("step"), e.get("total_steps"),
                        e.get("epoch"), e.get("loss"), e.get("tokens_per_s"), e.get("eta_s"), e.get("message"),
                    )
                    for e in events
                ],
            )  # fmt: skip
            sets = ["events_offset = ?", "updated_at = ?"]
            params: list[Any] = [new_offset, self._db.clock.iso()]
            if events and status in ACTIVE_RUN_STATUSES:
                last = events[-1]
                target = last.get("run_status")
                if target in _ORDER and _ORDER[target] > _ORDER[status]:
                    sets.append("status = ?")
                    params.append(target)
                    if target == "running":
                        sets.append("started_at = COALESCE(started_at, ?)")
                        params.append(to_iso(last["ts"]))
                for column in ("phase", "step", "total_steps", "progress", "loss", "tokens_per_s", "eta_s"):
                    if last.get(column) is not None:
                        sets.append(f"{column} = ?")
                        params.append(last[column])
                sets.append("message = ?")
                params.append(last.get("message"))
            await tx.execute(f"UPDATE runs SET {', '.join(sets)} WHERE id = ?", (*params, run_id))
        return await self.get(run_id)

    async def events(self, run_id: str, limit: int = 50) -> list[RunEvent]:
        rows = await self._db.fetchall(
            "SELECT * FROM (SELECT run_id, seq, ts, phase, step, total_steps, epoch, loss, tokens_per_s, eta_s,"
            " message FROM run_events WHERE run_id = ? ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            (run_id, limit),
        )
        return [RunEvent.from_row(r) for r in rows]

    async def request_cancel(self, run_id: str) -> Run:
        run = await self.get(run_id)
        if not run.active:
            raise Conflict(f"run {run_id} already ended as {run.status}; nothing to cancel")
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE runs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                (self._db.clock.iso(), run_id),
            )
        return await self.get(run_id)

    async def finish(
        self,
        run_id: str,
        status: RunStatus,
        *,
        finished_at: datetime | None = None,
        error: str | None = None,
        metrics: Mapping[str, Any] | None = None,
        gates: Sequence[Mapping[str, Any]] | None = None,
        new_version: int | None = None,
        version_path: str | None = None,
        losses: Mapping[int, float] | None = None,
        lost: Sequence[Mapping[str, Any]] | None = None,
    ) -> Run:
        """End a run in one transaction; a deploy also marks its new experiences trained.

        Idempotent: finishing a run that already ended changes nothing and returns it.
        """
        if status not in FINAL_RUN_STATUSES:
            raise ValueError(f"{status} is not a final run status")
        if status == "deployed" and (new_version is None or version_path is None):
            raise ValueError("a deployed run needs its new version and path")
        now = self._db.clock.iso()
        ended = to_iso(finished_at) if finished_at else now
        async with self._db.transaction() as tx:
            async with tx.execute("SELECT kernel, status FROM runs WHERE id = ?", (run_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise NotFound(f"no run with id {run_id!r}")
            kernel, current = row[0], row[1]
            if current in FINAL_RUN_STATUSES:
                return await self.get(run_id)
            await tx.execute(
                "UPDATE runs SET status = ?, phase = ?, error = ?, metrics = ?, gates = ?, new_version = ?,"
                " lost = ?, progress = CASE WHEN ? = 'deployed' THEN 1.0 ELSE progress END, eta_s = NULL,"
                " finished_at = ?, updated_at = ? WHERE id = ?",
                (
                    status, status, error, json.dumps(metrics) if metrics is not None else None,
                    json.dumps(list(gates)) if gates is not None else None, new_version,
                    json.dumps(list(lost)) if lost is not None else None, status, ended, now, run_id,
                ),
            )  # fmt: skip
            if status == "deployed":
                # Superseded or retired while the run trained: they stay out of replay and regression tests.
                await tx.execute(
                    "UPDATE experiences SET status = 'trained', trained_run_id = ?, updated_at = ?"
                    " WHERE id IN (SELECT experience_id FROM run_items WHERE run_id = ? AND role = 'new')"
                    " AND status IN ('new', 'needs_improvement')",
                    (run_id, now, run_id),
                )
                if losses:
                    await tx.executemany(
                        "UPDATE experiences SET last_loss = ? WHERE id = ? AND kernel = ?",
                        [(loss, exp_id, kernel) for exp_id, loss in losses.items()],
                    )
                await tx.execute(
                    "UPDATE versions SET status = 'retired' WHERE kernel = ? AND status = 'deployed'",
                    (kernel,),
                )
                await tx.execute(
                    "INSERT INTO versions (kernel, version, run_id, path, metrics, status, created_at, deployed_at)"
                    " VALUES (?, ?, ?, ?, ?, 'deployed', ?, ?)"
                    " ON CONFLICT (kernel, version) DO UPDATE SET status = 'deployed',"
                    " deployed_at = excluded.deployed_at",
                    (kernel, new_version, run_id, version_path, json.dumps(metrics or {}), ended, ended),
                )
                await tx.execute(
                    "UPDATE kernels SET deployed_version = ?, updated_at = ? WHERE name = ?",
                    (new_version, now, kernel),
                )
        return await self.get(run_id)
