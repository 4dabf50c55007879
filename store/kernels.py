"""The kernels table."""

from __future__ import annotations

import json
from typing import Any

from store.db import Database
from store.errors import Conflict, NotFound
from store.models import Kernel, KernelStatus


class Kernels:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def create(self, name: str, base_model: str, description: str, config: dict[str, Any]) -> Kernel:
        now = self._db.clock.iso()
        async with self._db.transaction() as tx:
            async with tx.execute("SELECT 1 FROM kernels WHERE name = ?", (name,)) as cur:
                if await cur.fetchone():
                    raise Conflict(f"kernel {name!r} already exists; use it, or pick another name")
            await tx.execute(
                "INSERT INTO kernels (name, base_model, description, config, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (name, base_model, description, json.dumps(config), now, now),
            )
        return await self.get(name)

    async def ensure(self, name: str, base_model: str, description: str, config: dict[str, Any]) -> Kernel:
        """Create the kernel unless it exists; return it either way."""
        existing = await self.find(name)
        if existing is not None:
            return existing
        try:
            return await self.create(name, base_model, description, config)
        except Conflict:
            return await self.get(name)

    async def find(self, name: str) -> Kernel | None:
        row = await self._db.fetchone("SELECT * FROM kernels WHERE name = ?", (name,))
        return None if row is None else Kernel.from_row(row)

    async def get(self, name: str) -> Kernel:
        kernel = await self.find(name)
        if kernel is None:
            names = ", ".join(k.name for k in await self.all()) or "none"
            raise NotFound(f"no kernel named {name!r} (existing: {names}); create it with create_kernel")
        return kernel

    async def all(self) -> list[Kernel]:
        return [Kernel.from_row(r) for r in await self._db.fetchall("SELECT * FROM kernels ORDER BY name")]

    async def set_deployed(self, name: str, version: int | None) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE kernels SET deployed_version = ?, updated_at = ? WHERE name = ?",
                (version, self._db.clock.iso(), name),
            )

    async def set_status(self, name: str, status: KernelStatus) -> None:
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE kernels SET status = ?, updated_at = ? WHERE name = ?",
                (status, self._db.clock.iso(), name),
            )

    async def reset_breaker(self, name: str) -> Kernel:
        """Failed runs before now no longer count towards the circuit breaker."""
        now = self._db.clock.iso()
        async with self._db.transaction() as tx:
            await tx.execute("UPDATE kernels SET breaker_reset_at = ?, updated_at = ? WHERE name = ?", (now, now, name))
        return await self.get(name)

    async def set_config(self, name: str, config: dict[str, Any], description: str | None = None) -> Kernel:
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE kernels SET config = ?, description = COALESCE(?, description), updated_at = ? WHERE name = ?",
                (json.dumps(config), description, self._db.clock.iso(), name),
            )
        return await self.get(name)
