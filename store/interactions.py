"""The interactions table: every query answered, with the feedback an agent gave on it."""

from __future__ import annotations

from collections.abc import Sequence

from store.db import Database
from store.errors import NotFound
from store.models import Interaction, Verdict


class Interactions:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add(
        self,
        kernel: str,
        version: int | None,
        prompt: str,
        system: str | None,
        response: str,
        latency_ms: float,
    ) -> Interaction:
        async with (
            self._db.transaction() as tx,
            tx.execute(
                "INSERT INTO interactions (kernel, version, prompt, system, response, latency_ms, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (kernel, version, prompt, system, response, latency_ms, self._db.clock.iso()),
            ) as cur,
        ):
            row = await cur.fetchone()
        assert row is not None
        return await self.get(int(row[0]))

    async def get(self, interaction_id: int) -> Interaction:
        row = await self._db.fetchone("SELECT * FROM interactions WHERE id = ?", (interaction_id,))
        if row is None:
            raise NotFound(f"no query with id {interaction_id}; use the query_id that query_kernel returned")
        return Interaction.from_row(row)  # type: ignore[no-any-return]

    async def set_feedback(
        self,
        interaction_id: int,
        rating: int,
        verdict: Verdict,
        correction: str | None,
        correction_experience_id: int | None,
    ) -> Interaction:
        async with self._db.transaction() as tx:
            await tx.execute(
                "UPDATE interactions SET rating = ?, verdict = ?, correction = ?, correction_experience_id = ?,"
                " feedback_at = ? WHERE id = ?",
                (rating, verdict, correction, correction_experience_id, self._db.clock.iso(), interaction_id),
            )
        return await self.get(interaction_id)

    async def review(self, kernel: str, limit: int) -> tuple[list[Interaction], int]:
        """The worst-rated answers nobody has corrected yet, worst and newest first; and how many there are."""
        where = "kernel = ? AND verdict = 'needs_improvement'"
        rows = await self._db.fetchall(
            f"SELECT * FROM interactions WHERE {where} ORDER BY rating, id DESC LIMIT ?", (kernel, limit)
        )
        total = await self._db.scalar(f"SELECT COUNT(*) FROM interactions WHERE {where}", (kernel,))
        return [Interaction.from_row(r) for r in rows], int(total)

    async def recent(self, kernel: str, limit: int = 50) -> list[Interaction]:
        rows = await self._db.fetchall(
            "SELECT * FROM interactions WHERE kernel = ? ORDER BY id DESC LIMIT ?", (kernel, limit)
        )
        return [Interaction.from_row(r) for r in rows]

    async def with_ids(self, ids: Sequence[int]) -> list[Interaction]:
        unique = sorted(set(ids))
        found: list[Interaction] = []
        for start in range(0, len(unique), 500):  # under SQLite's bound-variable cap
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = await self._db.fetchall(f"SELECT * FROM interactions WHERE id IN ({marks})", chunk)
            found += [Interaction.from_row(r) for r in rows]
        return found
