"""The quarantine table: files from another process that were refused, and why."""

from __future__ import annotations

from store.db import Database
from store.models import QuarantineEntry


class Quarantine:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, original: str, stored_as: str, reason: str) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                "INSERT INTO quarantine (original, stored_as, reason, created_at) VALUES (?, ?, ?, ?)",
                (original, stored_as, reason, self._db.clock.iso()),
            )

    async def known(self) -> set[str]:
        """Every quarantined file already recorded, by where it was stored."""
        return {str(r[0]) for r in await self._db.fetchall("SELECT stored_as FROM quarantine")}

    async def recent(self, limit: int = 50) -> list[QuarantineEntry]:
        rows = await self._db.fetchall("SELECT * FROM quarantine ORDER BY id DESC LIMIT ?", (limit,))
        return [QuarantineEntry.from_row(r) for r in rows]

    async def count(self) -> int:
        return int(await self._db.scalar("SELECT COUNT(*) FROM quarantine"))
