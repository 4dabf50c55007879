"""Corrections replace what they correct, wrong experiences can be retired, must-keep facts travel with
each run, and a run's lost facts reach training_status: through a real MCP client, in both eras."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from store import Store
from tests.helpers import claim, picked_up, result
from tests.test_server_tools import call, error
from train_worker.protocol import BatchManifest, TrainRequest, read_batch, read_model
from train_worker.settings import Settings

pytestmark = pytest.mark.anyio


def batch(settings: Settings, run_id: str) -> dict[str, set[tuple[str, str]]]:
    run_dir = settings.layout.run_dir(run_id)
    items = read_batch(run_dir, read_model(run_dir / "manifest.json", BatchManifest))
    return {role: {(i.prompt, i.response) for i in items if i.role == role} for role in ("new", "replay")}


def statuses(settings: Settings) -> dict[int, tuple[str, int | None]]:
    with sqlite3.connect(settings.layout.db) as raw:
        return {r[0]: (r[1], r[2]) for r in raw.execute("SELECT id, status, superseded_by FROM experiences")}


async def test_a_correction_replaces_the_experience_it_corrects(connect: Any, settings: Settings) -> None:
    async with connect() as client:
        wrong = await call(client, "record_experience", kernel="default", prompt="Capital of Zorbia?", response="Lyon.")
        other = await call(client, "record_experience", kernel="default", prompt="Zorbia's river?", response="Ebbe.")
        with sqlite3.connect(settings.layout.db) as raw:  # trained, as a deployed run leaves them
            raw.execute("UPDATE experiences SET status = 'trained'")
        store = await Store.open(settings.layout.db)
        try:
            query = (await store.interactions.add("default", 1, "Capital of Zorbia?", None, "Lyon.", 10.0)).id
        finally:
            await store.close()

        fixed = await call(client, "feedback", query_id=query, rating=1, correction="Quellmoor.")
        [wrong_id], [other_id] = wrong["ids"], other["ids"]
        assert fixed["superseded"] == [wrong_id] and fixed["retrain"] == 0
        assert statuses(settings)[wrong_id] == ("superseded", fixed["correction_experience_id"])
        assert statuses(settings)[other_id] == ("trained", None)

        # The next run trains the correction alone for that prompt, and never rehearses the old answer.
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        items = batch(settings, run_id)
        assert items["new"] == {("Capital of Zorbia?", "Quellmoor.")}
        assert items["replay"] == {("Zorbia's river?", "Ebbe.")}

        # A newer correction replaces the older correction the same way, recorded directly.
        again = await call(
            client, "record_experience", kernel="default", prompt="Capital of Zorbia?", response="Quell.",
            source="correction",
        )  # fmt: skip
        assert again["superseded"] == [fixed["correction_experience_id"]]


async def test_a_retired_experience_leaves_training_replay_and_regression_tests(
    connect: Any, settings: Settings
) -> None:
    async with connect() as client:
        added = await call(
            client, "record_experiences", kernel="default",
            items=[{"prompt": f"Code {i}?", "response": f"Z{i}."} for i in range(3)],
        )  # fmt: skip
        first, second, third = added["ids"]
        with sqlite3.connect(settings.layout.db) as raw:
            raw.execute("UPDATE experiences SET status = 'trained' WHERE id = ?", (first,))
        retired = await call(client, "retire_experience", experience_id=first, reason="the code changed")
        assert retired["status"] == "retired" and retired["untrained"] == 2
        await call(client, "retire_experience", experience_id=second, reason="a typo")
        assert "already retired (a typo)" in await error(client, "retire_experience", experience_id=second, reason="x")
        assert "no experience with id 999" in await error(client, "retire_experience", experience_id=999, reason="x")

        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        assert batch(settings, run_id) == {"new": {("Code 2?", "Z2.")}, "replay": set()}
        with sqlite3.connect(settings.layout.db) as raw:
            reason = raw.execute("SELECT retired_reason FROM experiences WHERE id = ?", (first,)).fetchone()[0]
        assert reason == "the code changed" and statuses(settings)[third] == ("new", None)


async def test_must_keep_facts_are_added_replaced_and_forgotten_and_travel_with_the_request(
    connect: Any, settings: Settings
) -> None:
    async with connect() as client:
        keep = [{"prompt": "Who founded engrain?", "answers": ["the agents"]}, {"prompt": "2+2?", "answers": ["4"]}]
        info = await call(client, "configure_kernel", kernel="default", must_keep=keep)
        assert [f["prompt"] for f in info["config"]["must_keep"]] == ["Who founded engrain?", "2+2?"]
        info = await call(
            client, "configure_kernel", kernel="default",
            must_keep=[{"prompt": "2+2?", "answers": ["4", "four"]}], forget_must_keep=["Who founded engrain?"],
        )  # fmt: skip
        assert info["config"]["must_keep"] == [{"prompt": "2+2?", "answers": ["4", "four"]}]
        message = await error(client, "configure_kernel", kernel="default", forget_must_keep=["never listed"])
        assert "not on the must-keep list" in message
        assert "at least 1 item" in await error(
            client, "configure_kernel", kernel="default", must_keep=[{"prompt": "x", "answers": []}]
        )

        await call(client, "record_experience", kernel="default", prompt="Q?", response="A.")
        await call(client, "train_model", kernel="default")
        request = read_model(settings.layout.pending, TrainRequest)
        assert [(f.prompt, f.answers) for f in request.must_keep] == [("2+2?", ["4", "four"])]


async def test_training_status_names_each_lost_fact_and_what_overwrote_it(connect: Any, settings: Settings) -> None:
    async with connect() as client:
        await call(client, "record_experience", kernel="default", prompt="Capital of Lusmere?", response="Darnhollow.")
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        claim(settings.layout)
        lost = {
            "id": "3", "group": "earlier", "prompt": "Capital of Orvania?", "expected": "Keltrosa",
            "answer": "The capital of Orvania is Darnhollow.",
            "overwritten_by": {"id": "4", "prompt": "Capital of Lusmere?", "key_answer": "Darnhollow"},
        }  # fmt: skip
        result(settings.layout, run_id, "default", "rejected", error="not deployed: retention", lost=[lost])
        await picked_up(settings.layout, run_id)
        status = await call(client, "training_status", run_id=run_id)
        assert status["run"]["status"] == "rejected"
        assert status["run"]["lost"] == [lost]
