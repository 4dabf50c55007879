"""The versions table: each kernel's adapter versions and which one is deployed."""

from __future__ import annotations

from store.db import Database
from store.errors import NotFound
from store.models import Version


class Versions:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def for_kernel(self, kernel: str) -> list[Version]:
        rows = await self._db.fetchall("SELECT * FROM versions WHERE kernel = ? ORDER BY version", (kernel,))
        return [Version.from_row(r) for r in rows]

    async def get(self, kernel: str, version: int) -> Version:
        row = await self._db.fetchone("SELECT * FROM versions WHERE kernel = ? AND version = ?", (kernel, version))
        if row is None:
            known = ", ".join(f"v{v.version}" for v in await self.for_kernel(kernel)) or "none"
            raise NotFound(f"kernel {kernel!r} has no version v{version} (known: {known})")
        return Version.from_row(row)  # type: ignore[no-any-return]

    async def mark_deployed(
        self, kernel: str, version: int | None, *, path: str | None = None, run_id: str | None = None
    ) -> None:
        """Make `version` the deployed one (None: the bare base model) and record it on the kernel.

        With `path`, a version the store never heard of (its run's result was lost) is added first.
        """
        now = self._db.clock.iso()
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE versions SET status = 'retired' WHERE kernel = ? AND status = 'deployed'", (kernel,)
            )
            if version is not None and path is not None:
                async with tx.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)) as cur:
                    known_run = await cur.fetchone() is not None
                await tx.execute(
                    "INSERT OR IGNORE INTO versions (kernel, version, run_id, path, status, created_at)"
                    " VALUES (?, ?, ?, ?, 'available', ?)",
                    (kernel, version, run_id if known_run else None, path, now),
                )
            if version is not None:
                await tx.execute(
                    "UPDATE versions SET status = 'deployed', deployed_at = ? WHERE kernel = ? AND version = ?",
                    (now, kernel, version),
                )
            await tx.execute(
                "UPDATE kernels SET deployed_version = ?, updated_at = ? WHERE name = ?",
                (version, now, kernel),
            )

    async def mark_converged(self, kernel: str, version: int) -> None:
        async with self._db.transaction() as tx:
            await tx.execute("UPDATE versions SET converged = 1 WHERE kernel = ? AND version = ?", (kernel, version))

    async def mark_pruned(self, kernel: str, versions: list[int]) -> None:
        async with self._db.transaction() as tx:
            await tx.executemany(
                "UPDATE versions SET status = 'pruned' WHERE kernel = ? AND version = ?",
                [(kernel, v) for v in versions],
            )
