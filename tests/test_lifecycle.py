"""The run lifecycle's crash points and stuck runs, played by hand against a real in-process server.

Each test is one failure the issue found (a run no tool could end, a request that looped, two servers
racing); the worker's side is played with the lifecycle functions the worker itself calls.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import anyio
import pytest
from mcp import Client

from server.app import create_server
from store.models import ACTIVE_RUN_STATUSES, FINAL_RUN_STATUSES, RunStatus
from tests.helpers import claim, event, eventually, fake_version
from tests.test_server_tools import FACTS, call, error
from train_worker import lifecycle
from train_worker.lifecycle import RunFiles
from train_worker.protocol import RunResult, TrainRequest, read_model, write_atomic, write_model
from train_worker.settings import Settings

pytestmark = pytest.mark.anyio


async def _run(client: Client, kernel: str = "default") -> str:
    await call(client, "record_experiences", kernel=kernel, items=FACTS)
    return str((await call(client, "train_model", kernel=kernel))["run_id"])


async def _status(client: Client, run_id: str) -> dict[str, Any]:
    return dict((await call(client, "training_status", run_id=run_id))["run"])


async def _ended(client: Client, run_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        run = await _status(client, run_id)
        return run if run["status"] in FINAL_RUN_STATUSES else None

    return dict(await eventually(done))


def test_the_store_and_the_lifecycle_name_the_same_statuses() -> None:
    assert set(get_args(RunStatus)) == set(get_args(lifecycle.RunStatus))
    assert ACTIVE_RUN_STATUSES == lifecycle.ACTIVE and FINAL_RUN_STATUSES == lifecycle.FINAL
    assert lifecycle.may_move("running", "deployed", "worker")
    assert not lifecycle.may_move("queued", "deployed", "worker")
    assert not lifecycle.may_move("deployed", "failed", "server")


async def test_a_refused_result_ends_its_run_and_training_can_start_again(settings: Settings) -> None:
    """A NaN loss used to be written as null, refused, and the run stayed active forever."""
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await _run(client)
        claim(layout)
        write_atomic(layout.active / run_id, b"")
        body = {
            "schema_version": 1, "kind": "run_result", "run_id": run_id, "kernel": "default", "status": "rejected",
            "finished_at": datetime.now(UTC).isoformat(), "losses": [{"experience_id": 1, "loss": None}],
        }  # fmt: skip
        (layout.results / f"{run_id}.json").write_text(json.dumps(body))
        run = await _ended(client, run_id)
        assert run["status"] == "failed" and "refused" in run["error"] and "losses.0.loss" in run["error"]
        entries = (layout.quarantine).glob(f"*{run_id}.json")
        assert list(entries)
        await call(client, "record_experiences", kernel="default", items=[{"prompt": "New?", "response": "Yes."}])
        again = await call(client, "train_model", kernel="default")
        assert again["run_id"] != run_id and not again["already_active"]


async def test_a_damaged_inbox_copy_is_replaced_from_the_run_folder(settings: Settings) -> None:
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await _run(client)
        claim(layout)
        good = RunResult(run_id=run_id, kernel="default", status="rejected", finished_at=datetime.now(UTC))
        write_model(layout.run_dir(run_id) / "result.json", good)
        (layout.results / f"{run_id}.json").write_bytes(b'{"schema_version": 1, "kind": "run_res')
        run = await _ended(client, run_id)
        assert run["status"] == "rejected"


async def test_a_crash_between_result_and_inbox_copy_is_recovered_by_the_server(settings: Settings) -> None:
    """Used to leave the run 'evaluating' for good."""
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await _run(client)
        claim(layout)
        write_atomic(layout.active / run_id, b"")
        ended = RunResult(run_id=run_id, kernel="default", status="rejected", finished_at=datetime.now(UTC))
        write_model(layout.run_dir(run_id) / "result.json", ended)  # and then the worker died
        run = await _ended(client, run_id)
        assert run["status"] == "rejected"
        assert (layout.archive / f"{run_id}.json").exists()
    # The next worker only tidies: it finds the result and drops the marker.
    assert lifecycle.resumable(layout) == [] and not (layout.active / run_id).exists()


async def test_a_claimed_run_without_its_marker_is_rearmed(settings: Settings) -> None:
    """An older worker crashed between the claim rename and the active marker: nothing would resume it."""
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await _run(client)
        claim(layout)  # renamed, no marker
        await _status(client, run_id)  # a sweep
        await eventually(lambda: (layout.active / run_id).exists())
        assert lifecycle.resumable(layout) == [run_id]


def test_a_crash_between_marker_and_rename_is_finished_by_the_next_worker(settings: Settings) -> None:
    layout = settings.layout
    layout.ensure()
    run_id = "r-20261123T200000-aaaaaa"
    request = TrainRequest(
        run_id=run_id, kernel="default", base_model="embedded", base_version=None,
        settings={}, gates={}, requested_at=datetime.now(UTC),
    )  # fmt: skip
    write_model(layout.pending, request)
    write_atomic(layout.active / run_id, b"")  # the marker came first, then the worker died
    assert lifecycle.observe(layout, run_id) == "claiming"
    assert lifecycle.resumable(layout) == [run_id]
    assert RunFiles(layout, run_id).claimed() and not layout.pending.exists()
    # Had the request been withdrawn meanwhile, the marker would just go.
    other = "r-20261123T200001-bbbbbb"
    write_atomic(layout.active / other, b"")
    assert lifecycle.resumable(layout) == [run_id] and not (layout.active / other).exists()


async def test_a_request_the_worker_refuses_ends_its_run_instead_of_looping(settings: Settings) -> None:
    """inf written as null: the worker quarantined pending.json, the server rewrote it 44 ms later, forever."""
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await _run(client)
        data = json.loads(layout.pending.read_text())
        data["settings"]["learning_rate"] = None  # what inf became on disk
        layout.pending.write_text(json.dumps(data))
        assert lifecycle.claim(layout) is None  # the worker's claim quarantines it and fails the run
        run = await _ended(client, run_id)
        assert run["status"] == "failed" and "learning_rate" in run["error"] and "quarantined" in run["error"]
        await anyio.sleep(0.3)
        assert not layout.pending.exists()  # not written again
        entries = await _quarantine_entries(settings)
        assert any("pending.json" in e for e in entries)


async def test_a_request_that_keeps_vanishing_is_rewritten_a_bounded_number_of_times(settings: Settings) -> None:
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await _run(client)
        for _ in range(5):
            layout.pending.unlink(missing_ok=True)  # a torn request the worker quarantined, with no run id
            await _status(client, run_id)
        run = await _ended(client, run_id)
        assert run["status"] == "failed" and "disappeared 3 times" in run["error"]


async def _quarantine_entries(settings: Settings) -> list[str]:
    import sqlite3

    with sqlite3.connect(settings.layout.db) as raw:
        return [f"{r[0]} {r[1]}" for r in raw.execute("SELECT original, reason FROM quarantine")]


async def test_files_the_worker_quarantined_are_recorded_once(settings: Settings) -> None:
    layout = settings.layout
    layout.ensure()
    from train_worker.protocol import quarantine

    bad = layout.runs / "batch.jsonl"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("torn")
    quarantine(bad, layout.quarantine, "batch.jsonl does not match manifest.json's sha256")
    async with Client(create_server(settings)) as client:
        await call(client, "list_kernels")
        await eventually(lambda: _quarantine_entries(settings))
        await call(client, "training_status")
        entries = await _quarantine_entries(settings)
        assert len(entries) == 1 and "sha256" in entries[0]


async def test_estop_holds_queued_and_pending_runs(settings: Settings) -> None:
    """The e-stop used to block train_model and the policy, but not a run already queued or pending."""
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        await call(client, "create_kernel", name="other")
        first = await _run(client)
        await call(client, "record_experiences", kernel="other", items=FACTS)
        second = (await call(client, "train_model", kernel="other"))["run_id"]
        assert (await _status(client, second))["status"] == "queued"
        layout.estop.write_text("maintenance\n")
        # The slot frees when `first` ends; with the e-stop in place the queued run must not take it.
        await call(client, "cancel_training", run_id=first)
        await _status(client, second)
        assert not layout.pending.exists(), "a queued run was promoted despite the e-stop"
        assert (await _status(client, second))["status"] == "queued"
        assert "e-stop" in await error(client, "train_model", kernel="default")
        layout.estop.unlink()

        async def promoted() -> bool:  # a status call sweeps, as the background sweep does every few seconds
            return bool((await _status(client, second))["status"] == "requested")

        await eventually(promoted)
        assert layout.pending.exists()


async def test_two_servers_on_one_home_make_one_active_run(settings: Settings) -> None:
    """Two train_model calls on two servers used to create two active runs and overwrite pending.json."""
    async with Client(create_server(settings)) as one, Client(create_server(settings)) as two:
        await call(one, "record_experiences", kernel="default", items=FACTS)
        ids: list[str] = []

        async def start(client: Client) -> None:
            ids.append((await call(client, "train_model", kernel="default"))["run_id"])

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(start, one if i % 2 else two)
        assert len(set(ids)) == 1
        request = read_model(settings.layout.pending, TrainRequest)
        assert request.run_id == ids[0]
        runs = (await call(one, "training_status"))["runs"]
        assert [r["run_id"] for r in runs] == [ids[0]]


async def test_a_stale_request_for_a_cancelled_run_is_withdrawn(settings: Settings) -> None:
    """A stale reconcile used to re-announce a run another server had cancelled."""
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await _run(client)
        request = read_model(layout.pending, TrainRequest)
        await call(client, "cancel_training", run_id=run_id)
        write_model(layout.pending, request)  # what the stale server wrote back
        await _status(client, run_id)
        await eventually(lambda: not layout.pending.exists())
        assert (layout.run_dir(run_id) / lifecycle.WITHDRAWN).exists()


async def test_the_store_follows_what_current_serves(settings: Settings) -> None:
    """A deployed result lost (or dropped for a run cancelled elsewhere) while `current` moved."""
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        fake_version(layout, "default", 1, "r-20261123T200000-000001")
        (layout.kernel_dir("default") / "current").symlink_to("versions/v1")
        await call(client, "training_status")
        kernel = (await call(client, "list_kernels"))["kernels"][0]
        assert kernel["deployed_version"] == 1
        await call(client, "rollback_kernel", kernel="default", version=0)
        assert (await call(client, "list_kernels"))["kernels"][0]["deployed_version"] is None


async def test_a_deploy_in_flight_is_left_to_its_result(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """The worker switches `current` just before it writes its result: a sweep in between used to take the
    deploy for a lost result and warn. Once the run ends without recording the version, the store follows."""
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await _run(client)
        claim(layout)
        write_atomic(layout.active / run_id, b"")
        event(layout, run_id, 0, "evaluating")

        async def evaluating() -> bool:
            return bool((await _status(client, run_id))["status"] == "evaluating")

        await eventually(evaluating)
        fake_version(layout, "default", 1, run_id)
        (layout.kernel_dir("default") / "current").symlink_to("versions/v1")
        assert (await _status(client, run_id))["status"] == "evaluating"
        assert (await call(client, "list_kernels"))["kernels"][0]["deployed_version"] is None
        assert "the store follows current" not in caplog.text
        ended = RunResult(run_id=run_id, kernel="default", status="failed", finished_at=datetime.now(UTC))
        write_model(layout.results / f"{run_id}.json", ended)
        await _ended(client, run_id)
        await call(client, "training_status")
        assert (await call(client, "list_kernels"))["kernels"][0]["deployed_version"] == 1


def test_leftover_staging_and_temp_files_are_swept(settings: Settings) -> None:
    layout = settings.layout
    layout.ensure()
    versions = layout.kernel_dir("k") / "versions"
    (versions / ".v3.staging").mkdir(parents=True)
    (versions / ".v3.staging" / "adapter_model.safetensors").write_bytes(b"half")
    (versions / "..v3.staging.abc.tmp").mkdir()
    fake_version(layout, "k", 2, "r-20261123T200000-000002")
    run_dir = layout.run_dir("r-20261123T200000-000002")
    (run_dir / "checkpoints" / ".step-000020.x.tmp").mkdir(parents=True)
    old_temp = layout.requests / ".pending.json.abc.tmp"
    old_temp.write_text("{")
    os.utime(old_temp, (time.time() - 7200, time.time() - 7200))
    fresh_temp = layout.requests / ".pending.json.def.tmp"
    fresh_temp.write_text("{")  # a server may be writing this right now
    removed = lifecycle.sweep_leftovers(layout)
    assert not (versions / ".v3.staging").exists() and not (versions / "..v3.staging.abc.tmp").exists()
    assert (versions / "v2").is_dir()
    assert not (run_dir / "checkpoints" / ".step-000020.x.tmp").exists()
    assert not old_temp.exists() and fresh_temp.exists()
    assert len(removed) == 4


def test_force_finish_waits_for_a_live_worker(settings: Settings, tmp_path: Path) -> None:
    from train_worker.locks import worker_lock

    layout = settings.layout
    layout.ensure()
    run_id = "r-20261123T200000-cccccc"
    layout.run_dir(run_id).mkdir(parents=True)
    (layout.run_dir(run_id) / "request.json").write_text("{}")
    write_atomic(layout.active / run_id, b"")
    held = worker_lock(layout.locks)
    assert held.acquire()
    try:
        assert lifecycle.force_finish(layout, run_id, "default", "cancelled", "x") is None
    finally:
        held.release()
    result = lifecycle.force_finish(layout, run_id, "default", "cancelled", "no worker")
    assert result is not None and result.status == "cancelled"
    assert (layout.results / f"{run_id}.json").exists() and not (layout.active / run_id).exists()


async def test_a_torn_result_json_is_resumed_not_failed(settings: Settings) -> None:
    """A crash tore result.json (and so its inbox copy): the run is still claimed, so a worker ends it again."""
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await _run(client)
        claim(layout)
        write_atomic(layout.active / run_id, b"")
        (layout.run_dir(run_id) / "result.json").write_text('{"schema_version": 1, "kind": "run_res')
        (layout.results / f"{run_id}.json").write_text('{"schema_version": 1, "kind": "run_res')
        await eventually(lambda: not (layout.results / f"{run_id}.json").exists())
        assert (await _status(client, run_id))["status"] in ("requested", "running")
        assert lifecycle.resumable(layout) == [run_id]  # the worker's view: quarantined, and resumed
        assert not (layout.run_dir(run_id) / "result.json").exists()
        reasons = " ".join(p.read_text() for p in layout.quarantine.glob("*.reason.txt"))
        assert "the run is resumed" in reasons
