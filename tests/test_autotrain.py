"""Learning from use through the MCP server: automatic runs under a steered clock, feedback, convergence."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from mcp import Client

from server.app import create_server
from store import Clock, Store
from tests.helpers import claim, eventually, fake_version, picked_up, result
from tests.test_server_tools import call, error
from train_worker.deploy import KernelFiles
from train_worker.protocol import BatchManifest, TrainRequest, read_batch, read_model
from train_worker.settings import Settings

pytestmark = pytest.mark.anyio

PASSING = [
    {"name": n, "metric": n, "value": 1.0, "threshold": 0.8, "comparison": ">=", "status": "passed", "passed": True,
     "margin": 0.2}
    for n in ("acquisition", "general_kept")
]  # fmt: skip


class SteeredClock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> SteeredClock:
    return SteeredClock(datetime(2026, 11, 23, 12, 0, tzinfo=UTC))


@pytest.fixture
def session(settings: Settings, clock: SteeredClock) -> Callable[[], Any]:
    @asynccontextmanager
    async def _open() -> AsyncIterator[Client]:
        async with Client(create_server(settings, clock=Clock(clock), local_tz=UTC)) as client:
            yield client

    return _open


def facts(prefix: str, n: int) -> list[dict[str, str]]:
    return [
        {"prompt": f"What is the {prefix} code {i}?", "response": f"The {prefix} code {i} is Z{i}."} for i in range(n)
    ]


async def auto(client: Client, kernel: str = "default") -> dict[str, Any]:
    return dict((await call(client, "training_status", kernel=kernel))["auto"])


async def enable(client: Client, **policy: Any) -> None:
    await call(client, "configure_kernel", kernel="default", auto={"enabled": True, **policy})


async def test_an_automatic_run_starts_when_the_threshold_is_reached(session: Any, settings: Settings) -> None:
    async with session() as client:
        await enable(client, min_untrained=3, cooldown_s=0)
        first = await call(client, "record_experiences", kernel="default", items=facts("a", 2))
        assert first["auto_run"] is None
        status = await auto(client)
        assert not status["due"] and "2 untrained experiences; the threshold is 3" in status["reasons"]
        second = await call(client, "record_experience", kernel="default", **facts("b", 1)[0])
        assert second["auto_run"] is not None
        run = (await call(client, "training_status", run_id=second["auto_run"]))["run"]
        assert (run["trigger"], run["status"], run["n_new"]) == ("auto", "requested", 3)
        assert read_model(settings.layout.pending, TrainRequest).run_id == second["auto_run"]


async def test_estop_blocks_manual_and_automatic_runs(session: Any, settings: Settings) -> None:
    async with session() as client:
        await enable(client, min_untrained=1, cooldown_s=0)
        settings.layout.estop.write_text("maintenance\n")
        recorded = await call(client, "record_experiences", kernel="default", items=facts("a", 2))
        assert recorded["auto_run"] is None
        assert "e-stop file" in await error(client, "train_model", kernel="default")
        assert any("e-stop" in r for r in (await auto(client))["reasons"])
        settings.layout.estop.unlink()
        again = await call(client, "record_experience", kernel="default", **facts("c", 1)[0])
        assert again["auto_run"] is not None


async def test_cooldown_and_window_follow_the_clock(session: Any, settings: Settings, clock: SteeredClock) -> None:
    async with session() as client:
        await enable(client, min_untrained=1, cooldown_s=3600, window="02:00-06:00")
        run_id = (await call(client, "record_experiences", kernel="default", items=facts("a", 1)))["auto_run"]
        assert run_id is None  # 12:00 is outside the window
        reasons = (await auto(client))["reasons"]
        assert "outside the training window 02:00-06:00 (local time now 12:00)" in reasons
        clock.now = datetime(2026, 11, 24, 2, 30, tzinfo=UTC)
        run_id = (await call(client, "record_experiences", kernel="default", items=facts("b", 1)))["auto_run"]
        assert run_id is not None
        claim(settings.layout)
        fake_version(settings.layout, "default", 1, run_id)
        KernelFiles(settings.layout, "default").switch(1)
        result(settings.layout, run_id, "default", "deployed", version=1, version_path="kernels/default/versions/v1",
               finished_at=clock.now, gates=PASSING)  # fmt: skip
        await picked_up(settings.layout, run_id)
        clock.now += timedelta(minutes=30)
        blocked = await call(client, "record_experiences", kernel="default", items=facts("c", 1))
        assert blocked["auto_run"] is None
        status = await auto(client)
        assert status["cooldown_remaining_s"] == pytest.approx(1800) and status["in_window"]
        clock.now += timedelta(minutes=31)
        assert (await call(client, "record_experiences", kernel="default", items=facts("d", 1)))["auto_run"]


async def _fail(settings: Settings, run_id: str, at: datetime) -> None:
    claim(settings.layout)
    result(settings.layout, run_id, "default", "failed", error="out of memory", finished_at=at)
    await picked_up(settings.layout, run_id)


async def test_the_breaker_opens_after_failures_and_a_reset_closes_it(
    session: Any, settings: Settings, clock: SteeredClock
) -> None:
    async with session() as client:
        await enable(client, min_untrained=1, cooldown_s=0, breaker_failures=2)
        run_id = (await call(client, "record_experiences", kernel="default", items=facts("a", 2)))["auto_run"]
        await _fail(settings, run_id, clock.now)
        # After one failure the next automatic run starts by itself; the experiences were not lost.
        await eventually(settings.layout.pending.exists)
        run_id = read_model(settings.layout.pending, TrainRequest).run_id
        await _fail(settings, run_id, clock.now)
        status = await auto(client)
        assert status["breaker_open"] and status["consecutive_failures"] == 2 and not status["due"]
        assert not settings.layout.pending.exists()
        assert status["untrained"] == 2
        clock.now += timedelta(seconds=1)
        closed = await call(client, "reset_circuit_breaker", kernel="default")
        assert not closed["breaker_open"] and closed["consecutive_failures"] == 0 and closed["due"]


async def test_convergence_stops_auto_training_until_new_experiences_differ(
    session: Any, settings: Settings, clock: SteeredClock
) -> None:
    layout = settings.layout
    async with session() as client:
        await enable(client, min_untrained=2, cooldown_s=0, converge_runs=2, converge_margin=0.1, converge_std=0.05)
        for version in (1, 2):
            run_id = (await call(client, "record_experiences", kernel="default", items=facts(f"r{version}", 2)))[
                "auto_run"
            ]
            assert run_id, f"round {version} should have started a run"
            claim(layout)
            fake_version(layout, "default", version, run_id)
            KernelFiles(layout, "default").switch(version)  # what a deploy does before its result
            result(layout, run_id, "default", "deployed", version=version,
                   version_path=f"kernels/default/versions/v{version}", finished_at=clock.now,
                   metrics={"acquisition_em": 1.0}, gates=PASSING)  # fmt: skip
            await picked_up(layout, run_id)
        kernel = await eventually(lambda: _kernel_if(client, "converged"))
        assert kernel["deployed_version"] == 2
        assert (KernelFiles(layout, "default").version_dir(2) / KernelFiles.KEEP_MARKER).exists()
        # More of the same: the converged kernel does not train on it.
        known = {
            "prompt": "What is the r1 code 1 and the r2 code 0?",
            "response": "The r1 code 1 is Z1 and the r2 code 0 is Z0.",
        }
        alike = [known, known | {"prompt": "And what is the r2 code 1 and the r1 code 0?"}]
        same = await call(client, "record_experiences", kernel="default", items=alike)
        assert same["auto_run"] is None
        status = await auto(client)
        assert status["kernel_status"] == "converged" and any("like what it knows" in r for r in status["reasons"])
        # Something new: drift is high, the kernel is active again and trains.
        novel = [
            {"prompt": "How do I reverse a list in Python?", "response": "Use reversed(items) or items[::-1]."},
            {"prompt": "Which SQL clause filters grouped rows?", "response": "HAVING filters rows after GROUP BY."},
        ]
        moved = await call(client, "record_experiences", kernel="default", items=novel)
        assert moved["auto_run"] is not None
        assert (await call(client, "training_status", kernel="default"))["kernel"]["status"] == "active"


async def _kernel_if(client: Client, status: str) -> dict[str, Any] | None:
    kernel = (await call(client, "list_kernels"))["kernels"][0]
    return dict(kernel) if kernel["status"] == status else None


async def test_feedback_builds_the_curriculum(session: Any, settings: Settings) -> None:
    async with session() as client:
        await call(client, "record_experience", kernel="default", prompt="Capital of Zorbia?", response="Quellmoor.")
        # Mark it trained, as a deployed run would, and log answers as query_kernel would.
        with sqlite3.connect(settings.layout.db) as raw:
            raw.execute("UPDATE experiences SET status = 'trained'")
        store = await Store.open(settings.layout.db)
        try:
            queries = {}
            for prompt, answer in [
                ("Capital of Zorbia?", "Paris."),
                ("Who founded Vantrel?", "Nobody knows."),
                ("What is 2+2?", "4."),
                ("Largest planet?", "Saturn."),
                ("Colour of the sky?", "Blue, mostly."),
            ]:
                queries[prompt] = (await store.interactions.add("default", None, prompt, None, answer, 10.0)).id
        finally:
            await store.close()

        gold = await call(client, "feedback", query_id=queries["What is 2+2?"], rating=5)
        assert gold["verdict"] == "gold" and gold["gold_experience_id"] and gold["untrained"] == 0
        forgot = await call(client, "feedback", query_id=queries["Capital of Zorbia?"], rating=1)
        assert forgot["verdict"] == "needs_improvement" and forgot["retrain"] == 1 and forgot["untrained"] == 1
        await call(client, "feedback", query_id=queries["Largest planet?"], rating=2)
        await call(client, "feedback", query_id=queries["Colour of the sky?"], rating=3)
        fixed = await call(
            client, "feedback", query_id=queries["Who founded Vantrel?"], rating=1,
            correction="Vantrel was founded by Ilsa Marrow.",
        )  # fmt: skip
        assert fixed["verdict"] == "corrected" and fixed["correction_experience_id"] and fixed["untrained"] == 2

        queue = await call(client, "review_queue", kernel="default")
        assert queue["total"] == 2
        worst = [(i["prompt"], i["rating"]) for i in queue["items"]]
        assert worst == [("Capital of Zorbia?", 1), ("Largest planet?", 2)]

        run_dir = settings.layout.run_dir((await call(client, "train_model", kernel="default"))["run_id"])
        items = read_batch(run_dir, read_model(run_dir / "manifest.json", BatchManifest))
        new = {(i.prompt, i.response) for i in items if i.role == "new"}
        replay = {(i.prompt, i.response) for i in items if i.role == "replay"}
        assert new == {
            ("Capital of Zorbia?", "Quellmoor."),
            ("Who founded Vantrel?", "Vantrel was founded by Ilsa Marrow."),
        }
        assert ("What is 2+2?", "4.") in replay  # the gold answer is rehearsed, not trained as new

        assert "no query with id 999" in await error(client, "feedback", query_id=999, rating=3)
        assert "less than or equal to 5" in await error(client, "feedback", query_id=queries["What is 2+2?"], rating=9)


def test_retention_keeps_newest_current_rollback_target_and_converged(settings: Settings) -> None:
    layout = settings.layout
    for version in range(1, 9):
        fake_version(layout, "k", version, f"r-20261123T200000-00000{version}")
    files = KernelFiles(layout, "k")
    files.switch(6)
    (files.version_dir(2) / KernelFiles.KEEP_MARKER).write_text("converged\n")
    removed = files.prune(keep=2)
    assert removed == [1, 3, 4]
    assert files.versions() == [2, 5, 6, 7, 8]
    assert files.current() == 6 and files.rollback_target() == 5
