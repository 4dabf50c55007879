"""The SQLite store: migrations, WAL, timestamps, deduplication and the run lifecycle."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from store import Clock, Store
from store.clock import from_iso, to_iso
from store.errors import Conflict, NotFound
from store.migrations import MIGRATIONS
from store.models import NewExperience

pytestmark = pytest.mark.anyio


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Store]]]:
    """Open stores (with kernel 'k') that are closed at teardown even when the test fails."""
    opened: list[Store] = []

    async def _open(clock: Clock | None = None, path: Path | None = None, kernel: bool = True) -> Store:
        store = await Store.open(path or tmp_path / "engrain.db", clock)
        opened.append(store)
        if kernel:
            await store.kernels.create("k", "embedded", "", {})
        return store

    yield _open
    for store in opened:
        await store.close()


def _exp(n: int, **kw: object) -> NewExperience:
    return NewExperience.model_validate({"prompt": f"q{n}", "response": f"a{n}", **kw})


async def test_migrations_apply_once_and_record_the_version(open_store: Any, tmp_path: Path) -> None:
    path = tmp_path / "engrain.db"
    store = await open_store(kernel=False)
    assert store.db.schema_version == len(MIGRATIONS)
    await open_store(kernel=False)  # a second open applies nothing
    with sqlite3.connect(path) as raw:
        rows = raw.execute("SELECT version, name FROM schema_migrations").fetchall()
        assert rows == [(m.version, m.name) for m in MIGRATIONS]
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"kernels", "experiences", "runs", "run_events", "versions", "interactions"} <= tables


async def test_a_newer_schema_is_refused_not_downgraded(tmp_path: Path) -> None:
    path = tmp_path / "engrain.db"
    await (await Store.open(path)).close()
    with sqlite3.connect(path) as raw:
        raw.execute("INSERT INTO schema_migrations VALUES (999, 'future', '2030-01-01T00:00:00+00:00')")
    with pytest.raises(RuntimeError, match="newer than this engrain knows"):
        await Store.open(path)


async def test_timestamps_are_utc_iso_text(open_store: Any) -> None:
    fixed = datetime(2026, 11, 23, 20, 0, tzinfo=UTC) + timedelta(microseconds=5)
    store = await open_store(Clock(lambda: fixed))
    kernel = await store.kernels.get("k")
    assert kernel.created_at == fixed
    raw = await store.db.scalar("SELECT created_at FROM kernels WHERE name = 'k'")
    assert raw == "2026-11-23T20:00:00.000005+00:00"
    assert from_iso(raw) == fixed
    with pytest.raises(ValueError, match="naive"):
        to_iso(datetime(2026, 1, 1))


async def test_add_many_deduplicates_by_key_and_content(open_store: Any) -> None:
    store = await open_store()
    first = await store.experiences.add_many("k", [_exp(1, idempotency_key="x"), _exp(2), _exp(2)])
    assert [a.duplicate for a in first] == [False, False, True]
    assert first[1].id == first[2].id
    again = await store.experiences.add_many("k", [_exp(1, idempotency_key="x"), _exp(2), _exp(3)])
    assert [a.duplicate for a in again] == [True, True, False]
    assert again[0].id == first[0].id and again[1].id == first[1].id
    assert await store.experiences.count("k") == 3
    stored = await store.experiences.get(again[2].id)
    assert (stored.prompt, stored.response, stored.status) == ("q3", "a3", "new")


async def test_a_reused_key_with_new_content_fails_the_whole_batch(open_store: Any) -> None:
    store = await open_store()
    await store.experiences.add_many("k", [_exp(1, idempotency_key="x")])
    with pytest.raises(Conflict, match=r"items\[1\]: idempotency_key 'x' was already used"):
        await store.experiences.add_many("k", [_exp(5), _exp(6, idempotency_key="x")])
    assert await store.experiences.count("k") == 1  # items[0] was rolled back too
    with pytest.raises(Conflict, match=r"items\[1\].*also used by items\[0\]"):
        await store.experiences.add_many("k", [_exp(7, idempotency_key="y"), _exp(8, idempotency_key="y")])
    assert await store.experiences.count("k") == 1


async def test_ids_returned_by_add_many_are_the_stored_rows(open_store: Any) -> None:
    store = await open_store()
    added = await store.experiences.add_many("k", [_exp(n) for n in range(50)])
    for n, a in enumerate(added):
        assert (await store.experiences.get(a.id)).prompt == f"q{n}"


async def test_run_lifecycle_deploy_marks_only_its_new_items_trained(open_store: Any) -> None:
    store = await open_store()
    ids = [a.id for a in await store.experiences.add_many("k", [_exp(n) for n in range(3)])]
    run = await store.runs.create("r-20261123T200000-aaaaaa", "k", "manual", None)
    assert run.status == "queued"
    await store.runs.mark_requested(run.id, [(ids[0], "new"), (ids[1], "new")])
    base: dict[str, Any] = {
        "ts": datetime.now(UTC),
        "epoch": None,
        "tokens_per_s": None,
        "eta_s": None,
        "message": None,
    }
    events = [
        {**base, "seq": 0, "phase": "claimed", "run_status": "running", "step": None, "total_steps": None},
        {**base, "seq": 1, "phase": "training", "run_status": "running", "step": 5, "total_steps": 10,
         "progress": 0.5, "loss": 1.25},
    ]  # fmt: skip
    run = await store.runs.record_events(run.id, events, 123)
    assert (run.status, run.phase, run.progress, run.loss, run.events_offset) == ("running", "training", 0.5, 1.25, 123)
    assert run.started_at is not None
    run = await store.runs.finish(
        run.id, "deployed", new_version=1, version_path="kernels/k/versions/v1", losses={ids[0]: 0.1}, metrics={"a": 1}
    )
    assert run.status == "deployed" and run.progress == 1.0
    statuses = [(await store.experiences.get(i)).status for i in ids]
    assert statuses == ["trained", "trained", "new"]
    assert (await store.experiences.get(ids[0])).last_loss == 0.1
    assert (await store.kernels.get("k")).deployed_version == 1
    [version] = await store.versions.for_kernel("k")
    assert (version.version, version.status, version.run_id) == (1, "deployed", run.id)
    # Finishing twice changes nothing (a result picked up again after a crash).
    again = await store.runs.finish(run.id, "failed", error="late")
    assert again.status == "deployed" and again.error is None


async def test_a_rejected_run_leaves_experiences_untrained(open_store: Any) -> None:
    store = await open_store()
    [a] = await store.experiences.add_many("k", [_exp(1)])
    run = await store.runs.create("r-20261123T200000-bbbbbb", "k", "manual", None)
    await store.runs.mark_requested(run.id, [(a.id, "new")])
    run = await store.runs.finish(run.id, "rejected", gates=[{"name": "acquisition_em", "status": "failed"}])
    assert run.status == "rejected" and run.gates == [{"name": "acquisition_em", "status": "failed"}]
    assert (await store.experiences.get(a.id)).status == "new"
    assert await store.experiences.count_untrained("k") == 1


async def test_progress_never_moves_a_run_backwards(open_store: Any) -> None:
    store = await open_store()
    run = await store.runs.create("r-20261123T200000-cccccc", "k", "manual", None)
    now = datetime.now(UTC)
    await store.runs.record_events(
        run.id, [{"seq": 0, "ts": now, "phase": "evaluating", "run_status": "evaluating"}], 1
    )
    run = await store.runs.record_events(
        run.id, [{"seq": 1, "ts": now, "phase": "training", "run_status": "running"}], 2
    )
    assert run.status == "evaluating"


async def test_unknown_ids_raise_not_found_with_guidance(open_store: Any) -> None:
    store = await open_store()
    with pytest.raises(NotFound, match="create it with create_kernel"):
        await store.kernels.get("nope")
    with pytest.raises(NotFound, match="no run with run_id"):
        await store.runs.get("r-20261123T200000-dddddd")
    with pytest.raises(NotFound, match="query_id"):
        await store.interactions.get(42)


async def test_migration_2_keeps_existing_data_and_links(
    open_store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made by the first release upgrades in place: rows, ids and foreign keys survive."""
    import store.migrations as migrations

    path = tmp_path / "engrain.db"
    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS[:1])
    old = await open_store()
    [added] = await old.experiences.add_many("k", [_exp(1)])
    await old.runs.create("r-20261123T200000-eeeeee", "k", "manual", None)
    await old.runs.mark_requested("r-20261123T200000-eeeeee", [(added.id, "new")])
    await old.close()

    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS)
    new = await open_store(kernel=False)
    assert new.db.schema_version == MIGRATIONS[-1].version
    kept = await new.experiences.get(added.id)
    assert (kept.prompt, kept.response, kept.status) == ("q1", "a1", "new")
    assert await new.runs.item_ids("r-20261123T200000-eeeeee", "new") == [added.id]
    [gold] = await new.experiences.add_many("k", [_exp(2, source="feedback")])
    assert (await new.experiences.get(gold.id)).source == "feedback"
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_migration_3_keeps_one_active_run_per_kernel_and_the_index_holds(
    open_store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two servers could each start a run for one kernel; the upgrade closes all but the oldest."""
    import store.migrations as migrations

    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS[:2])
    old = await open_store()
    for run_id in ("r-20261123T200000-aaaaaa", "r-20261123T200001-bbbbbb"):
        await old.runs.create(run_id, "k", "manual", None)
    await old.close()

    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS)
    new = await open_store(kernel=False)
    first, second = await new.runs.get("r-20261123T200000-aaaaaa"), await new.runs.get("r-20261123T200001-bbbbbb")
    assert first.status == "queued"
    assert second.status == "failed" and second.error and "already active" in second.error
    with pytest.raises(Conflict, match="already has an active run"):
        await new.runs.create("r-20261123T200002-cccccc", "k", "manual", None)
    await new.runs.finish(first.id, "cancelled")
    assert (await new.runs.create("r-20261123T200002-cccccc", "k", "manual", None)).status == "queued"


OLD_TRAIN = {  # what every kernel stored before migration 4: the whole settings dump of that release
    "learning_rate": 0.001, "max_epochs": 16, "batch_size": 8, "replay_ratio": 1.0, "replay_strategy": "uniform",
    "anchor_ratio": 1.0, "kl_weight": 1.0, "ewc_lambda": 0.0, "adapter": {"rank": 16, "alpha": 32.0},
}  # fmt: skip
OLD_GATES = {
    "min_acquisition_em": 0.8, "min_paraphrase_em": None, "min_retention_em": 0.8, "min_anchor_agreement": 0.3,
    "min_general_kept": 0.75, "max_ppl_ratio": 1.15, "min_schema_compliance": 1.0,
}  # fmt: skip


async def test_migration_4_moves_untouched_kernels_to_the_new_defaults_and_keeps_changed_ones(
    open_store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import store.migrations as migrations
    from server.kernel_config import KernelConfig

    monkeypatch.setattr(migrations, "MIGRATIONS", [m for m in MIGRATIONS if m.version < 4])
    old = await open_store(kernel=False)
    await old.kernels.create("untouched", "embedded", "", {"train": OLD_TRAIN, "gates": OLD_GATES})
    tuned = {"train": {**OLD_TRAIN, "learning_rate": 0.002}, "gates": {**OLD_GATES, "min_retention_em": 0.5}}
    await old.kernels.create("tuned", "embedded", "", tuned)
    [added] = await old.experiences.add_many("tuned", [_exp(1)])
    await old.close()

    monkeypatch.setattr(migrations, "MIGRATIONS", MIGRATIONS)
    new = await open_store(kernel=False)
    untouched = await new.kernels.get("untouched")
    assert untouched.config == {"train": {}, "gates": {}}
    assert KernelConfig.model_validate(untouched.config) == KernelConfig()  # the new defaults, learning method included
    tuned_now = KernelConfig.model_validate((await new.kernels.get("tuned")).config)
    assert tuned_now.train.learning_rate == 0.002 and tuned_now.gates.min_retention_kept == 0.5
    kept = await new.experiences.get(added.id)
    assert (kept.prompt, kept.status, kept.superseded_by, kept.retired_reason) == ("q1", "new", None, None)
    with sqlite3.connect(path := tmp_path / "engrain.db") as raw:
        assert raw.execute("PRAGMA foreign_key_check").fetchall() == []
    assert path.is_file()


def _open_and_close(path: str) -> None:
    import anyio

    async def main() -> None:
        await (await Store.open(Path(path))).close()

    anyio.run(main)


def test_servers_starting_at_once_on_a_fresh_home_all_open_the_store(tmp_path: Path) -> None:
    """Several processes opening a fresh database together: each one migrates or waits, none fails."""
    import multiprocessing

    for attempt in range(3):
        path = tmp_path / f"try{attempt}" / "engrain.db"
        path.parent.mkdir()
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_open_and_close, args=(str(path),)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        with sqlite3.connect(path) as raw:
            versions = [r[0] for r in raw.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == [m.version for m in MIGRATIONS]
