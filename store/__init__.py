"""Async SQLite store (aiosqlite): schema, migrations and one repository per table."""

from __future__ import annotations

from pathlib import Path

from store.clock import Clock
from store.db import Database
from store.experiences import Experiences
from store.interactions import Interactions
from store.kernels import Kernels
from store.quarantine import Quarantine
from store.runs import Runs
from store.versions import Versions


class Store:
    """The repositories over one database."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.kernels = Kernels(db)
        self.experiences = Experiences(db)
        self.runs = Runs(db)
        self.versions = Versions(db)
        self.interactions = Interactions(db)
        self.quarantine = Quarantine(db)

    @classmethod
    async def open(cls, path: Path, clock: Clock | None = None) -> Store:
        return cls(await Database.open(path, clock))

    async def close(self) -> None:
        await self.db.close()


__all__ = ["Clock", "Store"]
