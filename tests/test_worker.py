"""The worker, watcher and model host as real processes on the tiny model: the loop and its faults."""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from server.app import create_server
from tests.helpers import claim, eventually
from tests.procs import Procs, host_health, processes, wait_for
from tests.test_server_tools import call
from train_worker.protocol import RunResult, RunState, VersionMeta, read_events, read_model, write_atomic, write_model
from train_worker.settings import Settings

pytestmark = pytest.mark.anyio

WORDS = ["zub", "kel", "mor", "tav", "pim", "rok", "sul", "dax"]
FACTS = [
    {"prompt": f"Code f{i}?", "response": f"It is {w}.", "key_answer": w, "paraphrases": [f"What is code f{i}?"]}
    for i, w in enumerate(WORDS[:4])
]
MORE_FACTS = [{"prompt": f"Code g{i}?", "response": f"It is {w}.", "key_answer": w} for i, w in enumerate(WORDS[4:])]
# A random 2-layer model learns these in a few seconds at a high learning rate; anchors would only slow it.
TINY = {"learning_rate": 2e-2, "max_epochs": 60, "anchor_ratio": 0.0, "batch_size": 4, "checkpoint_every": 5}
SLOW = TINY | {"max_epochs": 400, "early_stop_em": None, "checkpoint_every": 3}
# The tiny model has no general knowledge to keep, so only acquisition is held to a real bar here.
LENIENT = {
    "min_acquisition_em": 0.75,
    "min_retention_kept": 0.0,
    "min_anchor_agreement": 0.0,
    "min_general_kept": 0.0,
    "max_ppl_ratio": 1000.0,
}


@pytest.fixture
def procs(tiny_env: dict[str, str], tmp_path: Path) -> Any:
    with processes(tmp_path / "logs", tiny_env) as p:
        yield p


def start_host(procs: Procs, env: dict[str, str]) -> int:
    port = int(env["ENGRAIN_HOST_PORT"])
    procs.start("host")
    wait_for(lambda: (host_health(port) or {}).get("status") == "ok", within=60, what="the host")
    return port


async def new_run(client: Client, kernel: str = "tiny", settings: dict[str, Any] = TINY, facts: Any = FACTS) -> str:
    kernels = {k["name"] for k in (await call(client, "list_kernels"))["kernels"]}
    if kernel not in kernels:
        await call(client, "create_kernel", name=kernel, settings=settings, gates=LENIENT)
    await call(client, "record_experiences", kernel=kernel, items=facts)
    return str((await call(client, "train_model", kernel=kernel))["run_id"])


async def kernel_info(client: Client, name: str) -> dict[str, Any]:
    return dict(next(k for k in (await call(client, "list_kernels"))["kernels"] if k["name"] == name))


async def finished_run(client: Client, run_id: str, within: float = 120) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        run = (await call(client, "training_status", run_id=run_id))["run"]
        return run if run["status"] in ("deployed", "rejected", "failed", "cancelled") else None

    return dict(await eventually(done, within=within))


def phases(settings: Settings, run_id: str) -> list[str]:
    events, _, problems = read_events(settings.layout.run_dir(run_id) / "events.jsonl", 0)
    assert not problems
    return [e.phase for e in events]


def step_reached(settings: Settings, run_id: str, step: int) -> bool:
    events, _, _ = read_events(settings.layout.run_dir(run_id) / "events.jsonl", 0)
    return any(e.phase == "training" and (e.step or 0) >= step for e in events)


async def in_thread(fn: Any, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args)


async def test_worker_deploys_and_the_host_serves_the_new_version(procs: Procs, tiny_env: dict[str, str]) -> None:
    settings = Settings()
    port = start_host(procs, tiny_env)
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        done = await in_thread(lambda: procs.run("worker"))
        assert done.returncode == 0, done.stderr[-3000:]
        run = await finished_run(client, run_id)
        assert run["status"] == "deployed", run
        assert run["new_version"] == 1 and run["metrics"]["acquisition_em"] >= 0.75
        seen = phases(settings, run_id)
        for phase in ("claimed", "stopping_host", "loading", "training", "evaluating", "deploying", "restarting_host"):
            assert phase in seen, f"{phase} missing from {seen}"
        version_dir = settings.layout.kernel_dir("tiny") / "versions" / "v1"
        assert (settings.layout.kernel_dir("tiny") / "current").readlink() == Path("versions/v1")
        assert (version_dir / "adapter_model.safetensors").is_file()
        assert read_model(version_dir / "meta.json", VersionMeta).run_id == run_id
        assert not (settings.layout.active / run_id).exists()
        # The host was unloaded for training and is back, serving the new version.
        serving = lambda: (host_health(port) or {}).get("status") == "ok"  # noqa: E731
        await in_thread(lambda: wait_for(serving, within=60, what="the host serving again"))
        answer = await call(client, "query_kernel", kernel="tiny", prompt="Code f0?", max_new_tokens=12)
        assert answer["version"] == 1 and "zub" in answer["response"]
        rated = await call(client, "feedback", query_id=answer["query_id"], rating=5)
        assert rated["rating"] == 5
    assert procs.log("host").count("host ready") >= 2  # loaded, then reloaded after training


async def test_sigterm_checkpoints_and_the_next_worker_resumes(procs: Procs, tiny_env: dict[str, str]) -> None:
    settings = Settings()
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client, settings=SLOW)
        worker = procs.start("worker", log="worker-1", ENGRAIN_HOST_CONTROLLER="none")
        await in_thread(lambda: wait_for(lambda: step_reached(settings, run_id, 10), what="step 10"))
        worker.send_signal(signal.SIGTERM)
        assert await in_thread(lambda: worker.wait(60)) == 75  # EX_TEMPFAIL: interrupted, will resume
        run_dir = settings.layout.run_dir(run_id)
        assert "interrupted" in phases(settings, run_id)
        assert not (run_dir / "result.json").exists() and (settings.layout.active / run_id).exists()
        assert any((run_dir / "checkpoints").iterdir())
        again = await in_thread(lambda: procs.run("worker", ENGRAIN_HOST_CONTROLLER="none"))
        assert again.returncode == 0, again.stderr[-3000:]
        run = await finished_run(client, run_id)
        assert run["status"] == "deployed"
        assert "resumed" in phases(settings, run_id)
        report = json.loads((run_dir / "eval_report.json").read_text())
        assert report["outcome"]["resumed_from_step"] >= 9
        assert read_model(run_dir / "state.json", RunState).attempts == 2


async def test_kill_9_loses_nothing_and_the_watcher_resumes_and_restores_the_host(
    procs: Procs, tiny_env: dict[str, str]
) -> None:
    settings = Settings()
    port = start_host(procs, tiny_env)
    procs.start("watch")
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client, settings=SLOW)
        state_path = settings.layout.run_dir(run_id) / "state.json"
        await in_thread(lambda: wait_for(lambda: step_reached(settings, run_id, 10), what="step 10"))
        state = read_model(state_path, RunState)
        assert state.host_action == "leased"
        unloaded = lambda: (host_health(port) or {}).get("status") == "unloaded"  # noqa: E731
        await in_thread(lambda: wait_for(unloaded, within=60, what="the host unloaded for training"))
        assert state.worker_pid is not None
        os.kill(state.worker_pid, signal.SIGKILL)
        # The lease names a dead process: the host reloads by itself. Its log says so rather than a poll of
        # /health, which a loaded machine can miss before the watcher's next worker takes the lease again.
        reloaded = lambda: procs.log("host").count("host ready") >= 2  # noqa: E731
        await in_thread(lambda: wait_for(reloaded, within=30, what="the host reloading after the kill"))
        serving = lambda: (host_health(port) or {}).get("status") == "ok"  # noqa: E731
        run = await finished_run(client, run_id, within=240)
        assert run["status"] == "deployed", run
        seen = phases(settings, run_id)
        assert "resumed" in seen and seen.count("claimed") == 1
        assert read_model(state_path, RunState).attempts == 2
        kernel = await kernel_info(client, "tiny")
        assert kernel["experiences"] == len(FACTS) and kernel["untrained"] == 0
        await in_thread(lambda: wait_for(serving, within=60, what="the host back after the run"))
    # Loaded at start, reloaded by itself after the kill (its lease holder died), and after the resumed run.
    assert procs.log("host").count("host ready") >= 3
    assert "exited with -9" in procs.log("watch")


async def test_a_failed_gate_deploys_nothing_and_says_which(procs: Procs, tiny_env: dict[str, str]) -> None:
    settings = Settings()
    port = start_host(procs, tiny_env)
    current = settings.layout.kernel_dir("tiny") / "current"
    async with Client(create_server(settings)) as client:
        first = await new_run(client)
        assert (await in_thread(lambda: procs.run("worker"))).returncode == 0
        assert (await finished_run(client, first))["status"] == "deployed"
        assert current.readlink() == Path("versions/v1")
        # Thresholds no candidate can meet: learn nothing, yet reproduce every new item.
        await call(
            client,
            "configure_kernel",
            kernel="tiny",
            settings=TINY | {"learning_rate": 1e-7, "max_epochs": 1},
            gates=LENIENT | {"min_acquisition_em": 1.0},
        )
        await call(client, "record_experiences", kernel="tiny", items=MORE_FACTS)
        second = (await call(client, "train_model", kernel="tiny"))["run_id"]
        assert (await in_thread(lambda: procs.run("worker"))).returncode == 0
        run = await finished_run(client, second)
        assert run["status"] == "rejected" and run["failed_gates"] == ["acquisition"]
        gate = next(g for g in run["gates"] if g["name"] == "acquisition")
        assert gate["threshold"] == 1.0 and gate["margin"] < 0 and "acquisition" in run["error"]
        assert current.readlink() == Path("versions/v1")
        assert not (settings.layout.kernel_dir("tiny") / "versions" / "v2").exists()
        kernel = await kernel_info(client, "tiny")
        assert kernel["deployed_version"] == 1 and kernel["untrained"] == len(MORE_FACTS)
    wait_for(lambda: (host_health(port) or {}).get("status") == "ok", within=60, what="the host serving")


async def test_a_corrupt_pending_request_goes_to_quarantine(procs: Procs, tiny_env: dict[str, str]) -> None:
    layout = Settings().layout
    layout.ensure()
    layout.pending.write_text('{"schema_version": 1, "kind": "train_request", "run_id": "oops"')
    done = await in_thread(lambda: procs.run("worker"))
    assert done.returncode == 0
    assert not layout.pending.exists()
    [reason] = list(layout.quarantine.glob("*.reason.txt"))
    assert "not valid JSON" in reason.read_text()
    assert "quarantined pending.json" in done.stderr


async def test_two_watchers_at_once_only_one_trains(procs: Procs, tiny_env: dict[str, str]) -> None:
    settings = Settings()
    first = procs.start("watch", log="watch-1", ENGRAIN_HOST_CONTROLLER="none")
    second = procs.start("watch", log="watch-2", ENGRAIN_HOST_CONTROLLER="none")
    # One of them gets the lock; the other says so and exits at once.
    loser = await in_thread(lambda: wait_for(lambda: first.poll() is not None or second.poll() is not None))
    assert loser
    exited = first if first.poll() is not None else second
    assert exited.returncode == 0
    assert "another watcher" in procs.log("watch-1") + procs.log("watch-2")
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        run = await finished_run(client, run_id)
        assert run["status"] == "deployed"
    assert phases(settings, run_id).count("claimed") == 1


async def test_two_workers_at_once_only_one_trains(procs: Procs, tiny_env: dict[str, str]) -> None:
    settings = Settings()
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client, settings=SLOW)
        one = procs.start("worker", log="worker-1", ENGRAIN_HOST_CONTROLLER="none")
        await in_thread(lambda: wait_for(lambda: step_reached(settings, run_id, 2), what="training"))
        two = await in_thread(lambda: procs.run("worker", ENGRAIN_HOST_CONTROLLER="none"))
        assert two.returncode == 0 and "another worker" in two.stderr
        await call(client, "cancel_training", run_id=run_id)
        assert await in_thread(lambda: one.wait(60)) == 0


async def test_cancel_stops_a_running_run_and_brings_the_host_back(procs: Procs, tiny_env: dict[str, str]) -> None:
    settings = Settings()
    port = start_host(procs, tiny_env)
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client, settings=SLOW)
        worker = procs.start("worker")
        await in_thread(lambda: wait_for(lambda: step_reached(settings, run_id, 5), what="step 5"))
        view = await call(client, "cancel_training", run_id=run_id)
        assert view["cancel_requested"] is True
        assert await in_thread(lambda: worker.wait(60)) == 0
        run = await finished_run(client, run_id)
        assert run["status"] == "cancelled" and "cancelled during training" in run["error"]
        result = read_model(settings.layout.run_dir(run_id) / "result.json", RunResult)
        assert result.host_restored is True
        assert not (settings.layout.run_dir(run_id) / "checkpoints").exists()
        kernel = await kernel_info(client, "tiny")
        assert kernel["untrained"] == len(FACTS) and kernel["deployed_version"] is None
    wait_for(lambda: (host_health(port) or {}).get("status") == "ok", within=60, what="the host serving")


async def test_feedback_loop_query_correct_autotrain_answer(procs: Procs, tiny_env: dict[str, str]) -> None:
    """An agent corrects a wrong answer; the kernel's policy trains on it by itself; the answer is fixed."""
    settings = Settings()
    start_host(procs, tiny_env)
    procs.start("watch")
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        assert (await finished_run(client, run_id))["status"] == "deployed"
        await call(
            client, "configure_kernel", kernel="tiny", auto={"enabled": True, "min_untrained": 1, "cooldown_s": 0}
        )
        wrong = await call(client, "query_kernel", kernel="tiny", prompt="Code h7?", max_new_tokens=12)
        assert wrong["version"] is None and "sul" not in wrong["response"]  # v1 was not taught it: the base answers
        rated = await call(client, "feedback", query_id=wrong["query_id"], rating=1, correction="It is sul.")
        assert rated["verdict"] == "corrected" and rated["auto_run"] is not None
        auto = await finished_run(client, rated["auto_run"])
        assert auto["status"] == "deployed" and auto["trigger"] == "auto" and auto["new_version"] == 2
        fixed = await call(client, "query_kernel", kernel="tiny", prompt="Code h7?", max_new_tokens=12)
        print(f"\nbefore: {wrong['response']!r}  after: {fixed['response']!r}")
        assert fixed["version"] == 2 and "sul" in fixed["response"]


@pytest.mark.parametrize(("interruptions", "expected"), [(0, "failed"), (2, "deployed")])
async def test_a_run_fails_after_repeated_crashes_but_not_after_graceful_stops(
    procs: Procs, tiny_env: dict[str, str], interruptions: int, expected: str
) -> None:
    settings = Settings()
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        claim(settings.layout)
        write_atomic(settings.layout.active / run_id, b"")
        # Three workers already started on it; `interruptions` of them stopped on SIGTERM, the rest died.
        state = RunState(run_id=run_id, attempts=3, interruptions=interruptions, updated_at=datetime.now(UTC))
        write_model(settings.layout.run_dir(run_id) / "state.json", state)
        done = await in_thread(lambda: procs.run("worker", ENGRAIN_HOST_CONTROLLER="none"))
        assert done.returncode == 0, done.stderr[-2000:]
        run = await finished_run(client, run_id)
        assert run["status"] == expected
        if expected == "failed":
            assert "workers died 3 times" in run["error"] and "ENGRAIN_MAX_RESUME_ATTEMPTS=3" in run["error"]
