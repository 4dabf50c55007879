"""The MCP tools through the SDK's in-process Client, in both protocol eras."""

from __future__ import annotations

import functools
import json
import sqlite3
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.helpers import claim, event, eventually, fake_version, picked_up, result
from train_worker.locks import worker_lock
from train_worker.protocol import (
    BatchItem,
    BatchManifest,
    RunResult,
    TrainRequest,
    read_batch,
    read_model,
    write_atomic,
    write_model,
)
from train_worker.settings import Settings

pytestmark = pytest.mark.anyio


def snapshot(settings: Settings) -> dict[str, Any]:
    """Every row of every table: 'nothing stored changed' means this is equal before and after."""
    with sqlite3.connect(settings.layout.db) as raw:
        tables = [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: raw.execute(f"SELECT * FROM {t}").fetchall() for t in tables}


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    r = await client.call_tool(tool, args)
    assert not r.is_error, r.content
    assert r.structured_content is not None
    return dict(r.structured_content)


async def error(client: Client, tool: str, **args: Any) -> str:
    r = await client.call_tool(tool, args)
    assert r.is_error, f"{tool} should have failed: {r.structured_content}"
    text = r.content[0].text  # type: ignore[union-attr]
    assert text, "an error the agent can act on must carry a message"
    return str(text)


FACTS = [
    {
        "prompt": "What is the capital of Zorbia?",
        "response": "The capital of Zorbia is Quellmoor.",
        "key_answer": "Quellmoor",
    },
    {"prompt": "Who founded Vantrel?", "response": "Vantrel was founded by Ilsa Marrow.", "key_answer": "Ilsa Marrow"},
]


GATE = {"name": "acquisition", "metric": "acquisition_em", "threshold": 0.8, "comparison": ">="}


async def test_tools_are_listed_with_input_and_output_schemas(connect: Any) -> None:
    async with connect() as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) >= {
            "create_kernel", "list_kernels", "record_experience", "record_experiences", "train_model",
            "training_status", "query_kernel", "feedback", "cancel_training", "rollback_kernel",
        }  # fmt: skip
        for t in tools.values():
            assert t.output_schema is not None, f"{t.name} has no structured output"
            assert t.description
        name_schema = tools["create_kernel"].input_schema["properties"]["name"]
        assert name_schema["pattern"] == "^[a-z0-9][a-z0-9_-]{0,62}$"
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert templates == {"engrain://kernels/{name}", "engrain://runs/{run_id}"}
        assert client.instructions and "record_experiences" in client.instructions


async def test_default_kernel_always_exists_and_kernels_can_be_created(connect: Any) -> None:
    async with connect() as client:
        names = [k["name"] for k in (await call(client, "list_kernels"))["kernels"]]
        assert names == ["default"]
        made = await call(client, "create_kernel", name="support-bot", description="helpdesk")
        assert made["uri"] == "engrain://kernels/support-bot" and made["deployed_version"] is None
        assert made["config"]["train"]["learning_rate"] > 0
        names = [k["name"] for k in (await call(client, "list_kernels"))["kernels"]]
        assert names == ["default", "support-bot"]
        res = await client.read_resource("engrain://kernels/support-bot")
        assert json.loads(res.contents[0].text)["description"] == "helpdesk"


@pytest.mark.parametrize("bad", ["Bad", "-x", "a" * 64, "../etc", "sp ace", ""])
async def test_bad_kernel_names_are_refused_and_nothing_changes(connect: Any, settings: Settings, bad: str) -> None:
    async with connect() as client:
        before = snapshot(settings)
        text = await error(client, "create_kernel", name=bad)
        assert "invalid kernel name" in text and "a-z, 0-9" in text
        text = await error(client, "record_experience", kernel=bad, prompt="p", response="r")
        assert "invalid kernel name" in text
        assert snapshot(settings) == before


async def test_duplicate_kernel_and_unknown_kernel_errors(connect: Any, settings: Settings) -> None:
    async with connect() as client:
        assert "already exists" in await error(client, "create_kernel", name="default")
        before = snapshot(settings)
        text = await error(client, "record_experience", kernel="ghost", prompt="p", response="r")
        assert "no kernel named 'ghost'" in text and "create_kernel" in text
        assert "no kernel named" in await error(client, "train_model", kernel="ghost")
        assert snapshot(settings) == before


async def test_base_model_must_be_a_local_directory(connect: Any, settings: Settings) -> None:
    async with connect() as client:
        text = await error(client, "create_kernel", name="k", base_model="HuggingFaceTB/SmolLM2-135M")
        assert "never downloads" in text


async def test_record_returns_ids_and_is_idempotent(connect: Any) -> None:
    async with connect() as client:
        one = await call(client, "record_experience", kernel="default", idempotency_key="k1", **FACTS[0])
        assert one["created"] == 1 and one["untrained"] == 1
        again = await call(client, "record_experience", kernel="default", idempotency_key="k1", **FACTS[0])
        assert again["ids"] == one["ids"] and again["duplicates"] == 1 and again["untrained"] == 1
        batch = await call(client, "record_experiences", kernel="default", items=FACTS)
        assert batch["ids"][0] == one["ids"][0]  # same content, already stored
        assert (batch["created"], batch["duplicates"], batch["untrained"]) == (1, 1, 2)


async def test_a_reused_key_with_other_content_is_refused(connect: Any, settings: Settings) -> None:
    async with connect() as client:
        await call(client, "record_experience", kernel="default", idempotency_key="k1", **FACTS[0])
        before = snapshot(settings)
        text = await error(client, "record_experience", kernel="default", idempotency_key="k1", **FACTS[1])
        assert "idempotency_key 'k1' was already used" in text and "new key" in text
        assert snapshot(settings) == before


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("prompt", "x" * 8001, "prompt is 8001 characters; the limit is 8000"),
        ("response", "y" * 16001, "response is 16001 characters; the limit is 16000"),
        ("prompt", "   ", "prompt is empty"),
        ("response", "", "response is empty"),
        ("system", "s" * 4001, "system is 4001 characters; the limit is 4000"),
    ],
)
async def test_empty_or_oversize_fields_name_the_field_and_limit(
    connect: Any, settings: Settings, field: str, value: str, expected: str
) -> None:
    async with connect() as client:
        before = snapshot(settings)
        args = {"prompt": "p", "response": "r", field: value}
        text = await error(client, "record_experience", kernel="default", **args)
        assert expected in text
        items = [{"prompt": "ok", "response": "ok"}, {"prompt": "p", "response": "r", field: value}]
        text = await error(client, "record_experiences", kernel="default", items=items)
        assert f"items[1].{expected}" in text
        assert snapshot(settings) == before  # items[0] was not stored either


async def test_batch_limit_and_key_answer_check(connect: Any, settings: Settings) -> None:
    async with connect() as client:
        before = snapshot(settings)
        items = [{"prompt": f"p{n}", "response": "r"} for n in range(1001)]
        assert "the limit is 1000 per call" in await error(client, "record_experiences", kernel="default", items=items)
        text = await error(
            client, "record_experience", kernel="default", prompt="p", response="Paris", key_answer="Lyon"
        )
        assert "does not occur in the response" in text
        assert snapshot(settings) == before


async def test_train_model_writes_batch_manifest_and_pending_request(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        started = await call(client, "train_model", kernel="default")
        run_id = started["run_id"]
        assert started["status"] == "requested" and started["status_uri"] == f"engrain://runs/{run_id}"
        assert (started["n_new"], started["already_active"]) == (2, False)
        # The worker's own models accept what the server wrote.
        request = read_model(layout.pending, TrainRequest)
        assert (request.run_id, request.kernel, request.base_model, request.base_version) == (
            run_id, "default", "embedded", None,
        )  # fmt: skip
        manifest = read_model(layout.run_dir(run_id) / "manifest.json", BatchManifest)
        items = read_batch(layout.run_dir(run_id), manifest)
        assert [i.prompt for i in items if i.role == "new"] == [f["prompt"] for f in FACTS]
        assert all(isinstance(i, BatchItem) and i.key_answer for i in items)
        # Asking again returns the same run instead of a duplicate.
        again = await call(client, "train_model", kernel="default")
        assert again["run_id"] == run_id and again["already_active"] is True


async def test_train_model_with_nothing_to_learn_says_so(connect: Any, settings: Settings) -> None:
    async with connect() as client:
        before = snapshot(settings)
        assert "no untrained experiences" in await error(client, "train_model", kernel="default")
        assert snapshot(settings) == before
        assert not settings.layout.pending.exists()


async def test_a_second_kernel_is_queued_until_the_slot_frees(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        await call(client, "create_kernel", name="other")
        await call(client, "record_experiences", kernel="default", items=FACTS[:1])
        await call(client, "record_experiences", kernel="other", items=FACTS[1:])
        first = await call(client, "train_model", kernel="default")
        second = await call(client, "train_model", kernel="other")
        assert (first["status"], second["status"]) == ("requested", "queued")
        assert read_model(layout.pending, TrainRequest).run_id == first["run_id"]
        claim(layout)  # the worker takes the slot; the server fills it with the queued run
        await eventually(layout.pending.exists)
        assert read_model(layout.pending, TrainRequest).run_id == second["run_id"]
        status = await call(client, "training_status", run_id=second["run_id"])
        assert status["run"]["status"] == "requested"


async def test_progress_events_feed_training_status(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        claim(layout)
        event(layout, run_id, 0, "claimed")
        event(layout, run_id, 1, "training", step=3, total_steps=12, loss=2.5, tokens_per_s=150.0, eta_s=40.0)
        run = (await call(client, "training_status", run_id=run_id))["run"]
        assert (run["status"], run["phase"], run["step"], run["total_steps"]) == ("running", "training", 3, 12)
        assert run["progress"] == pytest.approx(0.25) and run["loss"] == 2.5 and run["eta_s"] == 40.0
        assert [e["phase"] for e in run["recent_events"]] == ["claimed", "training"]
        event(layout, run_id, 2, "evaluating", message="scoring 2 items")
        run = (await call(client, "training_status", run_id=run_id))["run"]
        assert (run["status"], run["message"]) == ("evaluating", "scoring 2 items")
        by_kernel = await call(client, "training_status", kernel="default")
        assert by_kernel["run"]["run_id"] == run_id and by_kernel["kernel"]["active_run"] == run_id


async def test_a_hand_written_result_ends_the_run_and_is_archived(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        ids = (await call(client, "record_experiences", kernel="default", items=FACTS))["ids"]
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        claim(layout)
        fake_version(layout, "default", 1, run_id)
        (layout.kernel_dir("default") / "current").symlink_to("versions/v1")  # what a deploy switches
        path = result(
            layout, run_id, "default", "deployed", version=1, version_path="kernels/default/versions/v1",
            metrics={"acquisition_em": 1.0},
            gates=[GATE | {"value": 1.0, "status": "passed", "passed": True, "margin": 0.2}],
            losses=[{"experience_id": ids[0], "loss": 0.05}],
        )  # fmt: skip
        await picked_up(layout, run_id)
        assert (layout.archive / path.name).exists()
        run = (await call(client, "training_status", run_id=run_id))["run"]
        assert (run["status"], run["new_version"], run["gates"][0]["status"]) == ("deployed", 1, "passed")
        kernel = (await call(client, "list_kernels"))["kernels"][0]
        assert (kernel["deployed_version"], kernel["untrained"], kernel["active_run"]) == (1, 0, None)


async def test_a_rejected_result_names_the_failed_gate(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        claim(layout)
        gate = {"name": "general_kept", "metric": "general_kept", "value": 0.5, "threshold": 0.9, "comparison": ">="}
        result(
            layout, run_id, "default", "rejected", gates=[gate | {"status": "failed", "passed": False, "margin": -0.4}]
        )

        async def rejected() -> dict[str, Any] | None:
            run = (await call(client, "training_status", run_id=run_id))["run"]
            return run if run["status"] == "rejected" else None

        run = await eventually(rejected)
        assert run["failed_gates"] == ["general_kept"] and run["gates"][0]["margin"] == -0.4
        assert (await call(client, "list_kernels"))["kernels"][0]["untrained"] == 2


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{oops", "not valid JSON"),
        (b'{"schema_version": 3, "kind": "run_result"}', "schema_version 3"),
        (
            b'{"schema_version": 1, "kind": "run_result", "run_id": "r-20261123T200000-ffffff", "kernel": "default",'
            b' "status": "failed", "finished_at": "2026-11-23T20:00:00+00:00"}',
            "unknown run",
        ),
    ],
)
async def test_malformed_results_go_to_quarantine(
    connect: Any, settings: Settings, content: bytes, reason: str
) -> None:
    layout = settings.layout
    async with connect() as client:
        before = snapshot(settings)
        bad = layout.results / "r-20261123T200000-ffffff.json"
        bad.write_bytes(content)
        # The file moves first and its row follows: wait for both.
        await eventually(lambda: not bad.exists() and snapshot(settings)["quarantine"])
        [moved] = [p for p in layout.quarantine.iterdir() if not p.name.endswith(".reason.txt")]
        assert moved.read_bytes() == content
        assert reason in moved.with_name(moved.name + ".reason.txt").read_text()
        # The store's row follows the move: wait for it rather than race it.
        after = await eventually(lambda: (now := snapshot(settings))["quarantine"] and now)
        assert after["quarantine"][0][3].startswith(reason.split()[0]) or reason in after["quarantine"][0][3]
        after.pop("quarantine"), before.pop("quarantine")
        assert after == before
        assert (await call(client, "list_kernels"))["kernels"]  # the server is still serving


async def test_results_that_arrived_while_the_server_was_down_are_picked_up(settings: Settings, mode: str) -> None:
    from server.app import create_server

    layout = settings.layout
    async with Client(create_server(settings), mode=mode) as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
    claim(layout)
    result(layout, run_id, "default", "failed", error="out of memory")
    async with Client(create_server(settings), mode=mode) as client:
        run = (await call(client, "training_status", run_id=run_id))["run"]
        assert (run["status"], run["error"]) == ("failed", "out of memory")


async def test_unknown_and_malformed_run_ids(connect: Any) -> None:
    async with connect() as client:
        assert "no run with run_id" in await error(client, "training_status", run_id="r-20261123T200000-000000")
        assert "invalid run id" in await error(client, "training_status", run_id="../../x")
        assert "no run with run_id" in await error(client, "cancel_training", run_id="r-20261123T200000-000000")


async def test_cancel_a_requested_run_withdraws_its_request(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        run = await call(client, "cancel_training", run_id=run_id)
        assert run["status"] == "cancelled" and not layout.pending.exists()
        assert "already ended as cancelled" in await error(client, "cancel_training", run_id=run_id)
        assert (await call(client, "list_kernels"))["kernels"][0]["untrained"] == 2


async def test_cancel_a_running_run_asks_the_worker(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        claim(layout)
        worker = worker_lock(layout.locks)
        assert worker.acquire()  # a live worker has the run
        try:
            run = await call(client, "cancel_training", run_id=run_id)
        finally:
            worker.release()
        assert run["status"] == "requested" and run["cancel_requested"] is True
        assert (layout.run_dir(run_id) / "cancel").exists()


async def test_cancel_force_finishes_a_claimed_run_whose_worker_is_gone(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        claim(layout)
        write_atomic(layout.active / run_id, b"")
        run = await call(client, "cancel_training", run_id=run_id)
        assert run["status"] == "cancelled" and "force-finished" in run["error"]
        assert not (layout.active / run_id).exists()
        assert read_model(layout.run_dir(run_id) / "result.json", RunResult).status == "cancelled"
        await picked_up(layout, run_id)
        assert (await call(client, "list_kernels"))["kernels"][0]["untrained"] == 2


async def test_cancel_is_refused_once_the_deploy_has_committed(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        claim(layout)
        deploying = RunResult(run_id=run_id, kernel="default", status="deployed", finished_at=datetime.now(UTC))
        write_model(layout.run_dir(run_id) / "deploy.json", deploying)
        worker = worker_lock(layout.locks)
        assert worker.acquire()
        try:
            text = await error(client, "cancel_training", run_id=run_id)
        finally:
            worker.release()
        assert "can no longer be cancelled" in text and "rollback_kernel" in text
        assert not (layout.run_dir(run_id) / "cancel").exists()


async def test_query_without_a_host_says_how_to_start_it(connect: Any, settings: Settings) -> None:
    async with connect() as client:
        before = snapshot(settings)
        text = await error(client, "query_kernel", kernel="default", prompt="Hi")
        assert "model host is not running" in text and "engrain host" in text
        assert snapshot(settings) == before
        assert "no query with id 7" in await error(client, "feedback", query_id=7, rating=1)


async def test_rollback_switches_current_and_refuses_missing_versions(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        assert "no version before the bare base model" in await error(client, "rollback_kernel", kernel="default")
        # A kernel that never deployed has no folder yet: serving its bare base is still answered, not an error.
        # (The fuzz suite found this as an internal FileNotFoundError.)
        await call(client, "create_kernel", name="fresh")
        assert (await call(client, "rollback_kernel", kernel="fresh", version=0))["to_version"] is None
        fake_version(layout, "default", 1, "r-20261123T200000-000001")
        fake_version(layout, "default", 2, "r-20261123T200000-000002")
        (layout.kernel_dir("default") / "current").symlink_to("versions/v2")
        done = await call(client, "rollback_kernel", kernel="default")
        assert done["to_version"] == 1
        assert (layout.kernel_dir("default") / "current").readlink().name == "v1"
        assert "has no version v9" in await error(client, "rollback_kernel", kernel="default", version=9)
        done = await call(client, "rollback_kernel", kernel="default", version=0)
        assert done["to_version"] is None and not (layout.kernel_dir("default") / "current").exists()


async def test_a_run_update_is_pushed_when_its_result_is_picked_up(settings: Settings) -> None:
    """Legacy sessions subscribe with resources/subscribe; modern ones listen."""
    from mcp.server.subscriptions import ResourceUpdated

    from server.app import create_server

    layout = settings.layout
    got: list[str] = []

    async def handler(message: Any) -> None:
        uri = getattr(getattr(getattr(message, "root", message), "params", None), "uri", None)
        if uri is not None:
            got.append(str(uri))

    async with Client(create_server(settings), mode="legacy", message_handler=handler) as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        await client.session.subscribe_resource(f"engrain://runs/{run_id}")
        claim(layout)
        result(layout, run_id, "default", "failed", error="x")
        await eventually(lambda: f"engrain://runs/{run_id}" in got)

    async with Client(create_server(settings)) as client:
        await call(client, "record_experiences", kernel="default", items=[{"prompt": "n", "response": "m"}])
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        uri = f"engrain://runs/{run_id}"
        async with client.listen(resource_subscriptions=[uri]) as sub:
            claim(layout)
            result(layout, run_id, "default", "failed", error="y")
            with anyio.fail_after(30):
                async for ev in sub:
                    if isinstance(ev, ResourceUpdated) and ev.uri == uri:
                        break
        res = await client.read_resource(uri)
        assert json.loads(res.contents[0].text)["status"] == "failed"  # type: ignore[union-attr]


async def test_wait_for_training_sends_progress_notifications(connect: Any, settings: Settings) -> None:
    layout = settings.layout
    async with connect() as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        claim(layout)
        progress: list[tuple[float, str | None]] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append((done, message))

        def reported(step: int) -> bool:
            return any(f"step {step}/4" in (m or "") for _, m in progress)

        async def worker() -> None:
            event(layout, run_id, 0, "claimed")
            for step in (1, 2, 3):
                event(layout, run_id, step, "training", step=step, total_steps=4, loss=2.0 / step, eta_s=9.0)
                # The next step only once this one was reported: the tool polls, and a slow poll may merge two.
                await eventually(functools.partial(reported, step), within=30)
            result(layout, run_id, "default", "failed", error="disk full")

        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            r = await client.call_tool(
                "wait_for_training", {"run_id": run_id, "timeout_s": 30}, progress_callback=on_progress
            )
        assert not r.is_error and r.structured_content is not None
        assert r.structured_content["status"] == "failed"
        messages = [m or "" for _, m in progress]
        assert any("training, step 1/4" in m for m in messages) and any("step 3/4" in m for m in messages)
        assert messages[-1] == "failed: disk full" and progress[-1][0] == 100
        values = [v for v, _ in progress]
        assert values == sorted(values)


async def test_wait_for_training_returns_at_the_timeout(connect: Any, settings: Settings) -> None:
    async with connect() as client:
        await call(client, "record_experiences", kernel="default", items=FACTS)
        run_id = (await call(client, "train_model", kernel="default"))["run_id"]
        view = await call(client, "wait_for_training", run_id=run_id, timeout_s=0.5)
        assert view["status"] == "requested"


async def test_query_while_the_host_is_starting_says_so(connect: Any, settings: Settings) -> None:
    from train_worker.locks import host_lock

    lock = host_lock(settings.layout.locks)
    lock.path.parent.mkdir(parents=True, exist_ok=True)
    holder = await anyio.to_thread.run_sync(_hold_in_child, str(lock.path))
    try:
        async with connect() as client:
            text = await error(client, "query_kernel", kernel="default", prompt="Hi")
            assert "model host is starting" in text
    finally:
        holder.kill()
        holder.wait()


def _hold_in_child(path: str) -> Any:
    """A process that holds the host lock but serves nothing, like a host still loading its model."""
    import subprocess
    import sys

    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
        " print('locked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc
