"""The experiences table: what agents teach, deduplicated by idempotency key and content."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import TypeVar

from store.db import Database
from store.errors import Conflict, NotFound
from store.models import (
    UNTRAINED_STATUSES,
    AddedExperience,
    Experience,
    ExperienceSource,
    ExperienceStatus,
    NewExperience,
)

T = TypeVar("T")

_UNTRAINED = "('" + "', '".join(UNTRAINED_STATUSES) + "')"


def content_hash(prompt: str, response: str, system: str | None) -> str:
    """Identity of an experience's content: the same teaching is never stored twice."""
    return hashlib.sha256(json.dumps([prompt, response, system]).encode()).hexdigest()


class Experiences:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add_many(self, kernel: str, items: Sequence[NewExperience]) -> list[AddedExperience]:
        """Store a batch in one transaction. Duplicates return the stored id; a reused key conflicts."""
        hashes = [content_hash(i.prompt, i.response, i.system) for i in items]
        keys = [i.idempotency_key for i in items if i.idempotency_key is not None]
        now = self._db.clock.iso()
        async with self._db.transaction() as tx:
            by_hash: dict[str, int] = {}
            by_key: dict[str, tuple[int, str]] = {}
            # Two lookups, each on its own index (an OR of both would scan the kernel's rows),
            # chunked under SQLite's bound-variable cap.
            for chunk in _chunks(sorted(set(hashes)), 500):
                sql = f"SELECT id, content_hash FROM experiences WHERE kernel = ? AND content_hash IN ({_marks(chunk)})"
                by_hash.update({r[1]: r[0] for r in await tx.execute_fetchall(sql, (kernel, *chunk))})
            for chunk in _chunks(sorted(set(keys)), 500):
                sql = (
                    "SELECT id, idempotency_key, content_hash FROM experiences"
                    f" WHERE kernel = ? AND idempotency_key IN ({_marks(chunk)})"
                )
                by_key.update({r[1]: (r[0], r[2]) for r in await tx.execute_fetchall(sql, (kernel, *chunk))})

            outcomes: list[AddedExperience | None] = []
            to_insert: list[tuple[int, NewExperience, str]] = []
            pending_hash: dict[str, int] = {}  # content first seen in this batch -> its index
            pending_key: dict[str, int] = {}
            for index, (item, digest) in enumerate(zip(items, hashes, strict=True)):
                key = item.idempotency_key
                if key is not None and key in by_key:
                    stored_id, stored_hash = by_key[key]
                    if stored_hash != digest:
                        raise Conflict(
                            f"items[{index}]: idempotency_key {key!r} was already used for experience "
                            f"{stored_id} with different content; use a new key for new content"
                        )
                    outcomes.append(AddedExperience(id=stored_id, duplicate=True))
                    continue
                if key is not None and key in pending_key:
                    first = pending_key[key]
                    if hashes[first] != digest:
                        raise Conflict(
                            f"items[{index}]: idempotency_key {key!r} is also used by items[{first}] "
                            "with different content; give each experience its own key"
                        )
                if digest in by_hash:
                    outcomes.append(AddedExperience(id=by_hash[digest], duplicate=True))
                    continue
                if digest in pending_hash or (key is not None and key in pending_key):
                    outcomes.append(None)  # resolved to the first occurrence's id below
                    continue
                pending_hash[digest] = index
                if key is not None:
                    pending_key[key] = index
                outcomes.append(None)
                to_insert.append((index, item, digest))

            new_ids: dict[int, int] = {}
            columns = 14
            for part in _chunks(to_insert, 500):  # 500 rows x 14 columns stays under the variable cap
                rows = ",".join(["(" + ",".join("?" * columns) + ")"] * len(part))
                params = [
                    value
                    for _, i, d in part
                    for value in (
                        kernel, i.prompt, i.response, i.system, i.key_answer, json.dumps(i.paraphrases),
                        i.source, i.priority, i.idempotency_key, d, i.interaction_id, i.status, now, now,
                    )
                ]  # fmt: skip
                returned = await tx.execute_fetchall(
                    "INSERT INTO experiences (kernel, prompt, response, system, key_answer, paraphrases, source,"
                    " priority, idempotency_key, content_hash, interaction_id, status, created_at, updated_at)"
                    f" VALUES {rows} RETURNING id, content_hash",
                    params,
                )
                # Content is unique per kernel, so the hash maps each returned id to its item.
                stored = {r[1]: int(r[0]) for r in returned}
                new_ids.update({index: stored[d] for index, _, d in part})

            # A correction replaces what it corrects: every other experience with its prompt (and system text).
            superseded: dict[int, list[int]] = {}
            for index, item, _ in to_insert:
                if item.source != "correction":
                    continue
                replaced = await tx.execute_fetchall(
                    "UPDATE experiences SET status = 'superseded', superseded_by = ?, updated_at = ?"
                    " WHERE kernel = ? AND prompt = ? AND system IS ? AND id != ?"
                    " AND status NOT IN ('superseded', 'retired') RETURNING id",
                    (new_ids[index], now, kernel, item.prompt, item.system, new_ids[index]),
                )
                superseded[index] = sorted(int(r[0]) for r in replaced)

        result: list[AddedExperience] = []
        for index, outcome in enumerate(outcomes):
            if outcome is not None:
                result.append(outcome)
            elif index in new_ids:
                result.append(AddedExperience(id=new_ids[index], duplicate=False, superseded=superseded.get(index, [])))
            else:
                key = items[index].idempotency_key
                first = pending_key[key] if key is not None and key in pending_key else pending_hash[hashes[index]]
                result.append(AddedExperience(id=new_ids[first], duplicate=True))
        return result

    async def get(self, experience_id: int) -> Experience:
        row = await self._db.fetchone("SELECT * FROM experiences WHERE id = ?", (experience_id,))
        if row is None:
            raise NotFound(f"no experience with id {experience_id}")
        return Experience.from_row(row)  # type: ignore[no-any-return]

    async def count(self, kernel: str, status: ExperienceStatus | None = None) -> int:
        if status is None:
            return int(await self._db.scalar("SELECT COUNT(*) FROM experiences WHERE kernel = ?", (kernel,)))
        sql = "SELECT COUNT(*) FROM experiences WHERE kernel = ? AND status = ?"
        return int(await self._db.scalar(sql, (kernel, status)))

    async def count_untrained(self, kernel: str) -> int:
        sql = f"SELECT COUNT(*) FROM experiences WHERE kernel = ? AND status IN {_UNTRAINED}"
        return int(await self._db.scalar(sql, (kernel,)))

    async def untrained(self, kernel: str, limit: int) -> list[Experience]:
        rows = await self._db.fetchall(
            f"SELECT * FROM experiences WHERE kernel = ? AND status IN {_UNTRAINED} ORDER BY priority DESC, id LIMIT ?",
            (kernel, limit),
        )
        return [Experience.from_row(r) for r in rows]

    async def replay_pool(self, kernel: str, limit: int) -> list[Experience]:
        """Up to `limit` trained experiences, a uniform sample when there are more, oldest first."""
        rows = await self._db.fetchall(
            "SELECT * FROM (SELECT * FROM experiences WHERE kernel = ? AND status = 'trained'"
            " ORDER BY random() LIMIT ?) ORDER BY id",
            (kernel, limit),
        )
        return [Experience.from_row(r) for r in rows]

    async def texts(self, kernel: str, *, untrained: bool, limit: int) -> list[str]:
        """Prompt and response text of a uniform sample of untrained (or trained) experiences."""
        where = f"status IN {_UNTRAINED}" if untrained else "status = 'trained'"
        rows = await self._db.fetchall(
            f"SELECT prompt || ' ' || response FROM experiences WHERE kernel = ? AND {where} ORDER BY random() LIMIT ?",
            (kernel, limit),
        )
        return [str(r[0]) for r in rows]

    async def mark_needs_improvement(self, kernel: str, prompt: str) -> int:
        """A trained experience whose prompt was answered badly is trained again; returns how many."""
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "UPDATE experiences SET status = 'needs_improvement', updated_at = ?"
                " WHERE kernel = ? AND prompt = ? AND status = 'trained' AND source != 'feedback'",
                (self._db.clock.iso(), kernel, prompt),
            )
            return int(cur.rowcount)

    async def retire(self, experience_id: int, reason: str) -> Experience:
        """Take a wrong experience out of training, replay and the regression tests, keeping it and the reason."""
        async with self._db.transaction() as tx:
            cur = await tx.execute(
                "UPDATE experiences SET status = 'retired', retired_reason = ?, updated_at = ?"
                " WHERE id = ? AND status != 'retired'",
                (reason, self._db.clock.iso(), experience_id),
            )
            changed = cur.rowcount
        experience = await self.get(experience_id)
        if not changed:
            raise Conflict(f"experience {experience_id} is already retired ({experience.retired_reason})")
        return experience

    async def for_kernel(
        self, kernel: str, status: ExperienceStatus | None = None, limit: int = 100, offset: int = 0
    ) -> list[Experience]:
        where, params = "kernel = ?", [kernel]
        if status is not None:
            where += " AND status = ?"
            params.append(status)
        rows = await self._db.fetchall(
            f"SELECT * FROM experiences WHERE {where} ORDER BY id LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        return [Experience.from_row(r) for r in rows]

    async def search(
        self,
        kernel: str,
        text: str = "",
        source: ExperienceSource | None = None,
        status: ExperienceStatus | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> tuple[list[Experience], int]:
        """Newest first, filtered by words in the prompt or response (case-insensitive), source and status;
        and how many match in all."""
        where, params = ["kernel = ?"], [kernel]
        for word in text.split():
            # instr, not LIKE: the user's '%' and '_' are plain characters here.
            where.append("(instr(lower(prompt), ?) > 0 OR instr(lower(response), ?) > 0)")
            params += [word.lower(), word.lower()]
        if source is not None:
            where.append("source = ?")
            params.append(source)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        clause = " AND ".join(where)
        rows = await self._db.fetchall(
            f"SELECT * FROM experiences WHERE {clause} ORDER BY id DESC LIMIT ? OFFSET ?", (*params, limit, offset)
        )
        total = await self._db.scalar(f"SELECT COUNT(*) FROM experiences WHERE {clause}", params)
        return [Experience.from_row(r) for r in rows], int(total)

    async def with_ids(self, ids: Sequence[int]) -> list[Experience]:
        found: list[Experience] = []
        for chunk in _chunks(sorted(set(ids)), 500):
            rows = await self._db.fetchall(f"SELECT * FROM experiences WHERE id IN ({_marks(chunk)})", chunk)
            found += [Experience.from_row(r) for r in rows]
        return found

    async def corrections_for(self, kernel: str, prompts: Sequence[str]) -> list[Experience]:
        """Corrections recorded for any of these prompts, oldest first."""
        found: list[Experience] = []
        for chunk in _chunks(sorted(set(prompts)), 500):
            rows = await self._db.fetchall(
                f"SELECT * FROM experiences WHERE kernel = ? AND source = 'correction' AND prompt IN ({_marks(chunk)})"
                " ORDER BY id",
                (kernel, *chunk),
            )
            found += [Experience.from_row(r) for r in rows]
        return found


def _marks(values: Sequence[object]) -> str:
    return ",".join("?" * len(values))


def _chunks(values: list[T], size: int) -> list[list[T]]:
    return [values[i : i + size] for i in range(0, len(values), size)]
