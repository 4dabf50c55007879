"""The SQLite connection pair: one writer (serialised transactions) and one reader (WAL snapshot)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from store.clock import Clock
from store.migrations import apply_migrations

log = logging.getLogger(__name__)

Params = Sequence[Any] | dict[str, Any]


class Database:
    """All SQL goes through here. Writes are serialised on one connection; reads never block them."""

    def __init__(self, writer: aiosqlite.Connection, reader: aiosqlite.Connection, clock: Clock) -> None:
        self._writer = writer
        self._reader = reader
        self._write_lock = anyio.Lock()
        self.clock = clock
        self.schema_version = 0

    @classmethod
    async def open(cls, path: Path, clock: Clock | None = None) -> Database:
        path.parent.mkdir(parents=True, exist_ok=True)
        _private_files(path)
        clock = clock or Clock()
        # Two servers starting at once on a fresh home would both switch to WAL and migrate: one at a time.
        lock = os.open(
            path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            await anyio.to_thread.run_sync(fcntl.flock, lock, fcntl.LOCK_EX)
            writer = await _connect(path)
            try:
                await writer.execute("PRAGMA journal_mode=WAL")
                db_version = await apply_migrations(writer, clock.iso())
                reader = await _connect(path)
                await reader.execute("PRAGMA query_only=ON")
            except BaseException:
                await writer.close()
                raise
        finally:
            os.close(lock)  # and with it the lock
        db = cls(writer, reader, clock)
        db.schema_version = db_version
        return db

    async def close(self) -> None:
        await self._reader.close()
        await self._writer.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction: committed on success, rolled back on any error or cancellation."""
        async with self._write_lock:
            await self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._writer
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._writer.rollback()
                raise
            else:
                with anyio.CancelScope(shield=True):
                    await self._writer.commit()

    # execute_fetchall is one trip to the connection's thread; execute + fetch + close would be three.
    async def fetchone(self, sql: str, params: Params = ()) -> aiosqlite.Row | None:
        rows = list(await self._reader.execute_fetchall(sql, params))
        return rows[0] if rows else None

    async def fetchall(self, sql: str, params: Params = ()) -> Iterable[aiosqlite.Row]:
        return await self._reader.execute_fetchall(sql, params)

    async def scalar(self, sql: str, params: Params = ()) -> Any:
        row = await self.fetchone(sql, params)
        return None if row is None else row[0]


def _private_files(path: Path) -> None:
    """Create the database 0600 before SQLite does (its WAL and shm files take the database's mode)."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        target = path.with_name(name)
        with contextlib.suppress(FileNotFoundError):
            if target.stat().st_mode & 0o077:
                target.chmod(0o600)  # written by an older engrain, or under a looser umask


async def _connect(path: Path) -> aiosqlite.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so transactions are explicit.
    conn = await aiosqlite.connect(path, isolation_level=None)
    conn.row_factory = aiosqlite.Row
    await conn.execute("PRAGMA foreign_keys=ON")
    await conn.execute("PRAGMA busy_timeout=5000")
    await conn.execute("PRAGMA synchronous=NORMAL")
    return conn
