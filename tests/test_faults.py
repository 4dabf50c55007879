"""The fault suite on real worker processes and the tiny model: crashes, signals, cancels and full disks
at named points of a run (`ENGRAIN_FAULT`, train_worker/faults.py). bench/faults.py repeats these, and
more, many times for the figures in docs/reliability.md.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from server import dispatch
from server.app import create_server
from tests.helpers import fake_version
from tests.procs import Procs, processes, wait_for
from tests.test_server_tools import call, error
from tests.test_worker import FACTS, LENIENT, TINY, finished_run, in_thread, new_run, phases
from train_worker.protocol import RunState, read_model
from train_worker.settings import Settings

pytestmark = pytest.mark.anyio

# No host runs in these tests: the worker still takes its lease (nothing answers, so it waits for nothing).
NO_HOST = {"ENGRAIN_HOST_CONTROLLER": "lease"}


@pytest.fixture
def procs(tiny_env: dict[str, str], tmp_path: Path) -> Any:
    with processes(tmp_path / "logs", tiny_env) as p:
        yield p


class Faulty:
    """A worker started with a fault at one point; `ready` appears when a paused worker reaches it."""

    def __init__(self, procs: Procs, tmp_path: Path, fault: str, **env: str) -> None:
        self.ready = tmp_path / f"ready-{fault.replace(':', '-')}"
        self.ready.unlink(missing_ok=True)
        self.proc = procs.start(
            "worker", log=f"worker-{fault.replace(':', '-')}", ENGRAIN_FAULT=fault,
            ENGRAIN_FAULT_READY=str(self.ready), **{**NO_HOST, **env},
        )  # fmt: skip

    async def reached(self, within: float = 120) -> None:
        await in_thread(lambda: wait_for(lambda: self.ready.exists() or self.proc.poll() is not None, within))
        assert self.ready.exists(), f"the worker exited ({self.proc.returncode}) before reaching the fault point"

    async def exit_code(self, within: float = 120) -> int:
        return int(await in_thread(lambda: self.proc.wait(within)))

    async def stopped_by(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return await self.exit_code()


async def worker(procs: Procs) -> subprocess.CompletedProcess[str]:
    done: subprocess.CompletedProcess[str] = await in_thread(
        lambda: procs.run("worker", ENGRAIN_HOST_CONTROLLER=NO_HOST["ENGRAIN_HOST_CONTROLLER"])
    )
    assert done.returncode in (0, 75), done.stderr[-3000:]
    return done


async def test_kill_9_between_the_marker_and_the_claim_then_the_next_worker_trains(
    procs: Procs, tmp_path: Path
) -> None:
    settings = Settings()
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        crashed = Faulty(procs, tmp_path, "kill:claim")
        assert await crashed.exit_code() == -signal.SIGKILL
        assert (settings.layout.active / run_id).exists() and settings.layout.pending.exists()
        await worker(procs)
        run = await finished_run(client, run_id)
        assert run["status"] == "deployed", run
        assert phases(settings, run_id).count("claimed") == 1


@pytest.mark.parametrize("point", ["deploying", "switch"])
async def test_a_deploy_interrupted_by_kill_9_completes_once(procs: Procs, tmp_path: Path, point: str) -> None:
    """After the commit (deploying) nothing was installed: trained again. After install (switch): finished."""
    settings = Settings()
    current = settings.layout.kernel_dir("tiny") / "current"
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        crashed = Faulty(procs, tmp_path, f"kill:{point}")
        assert await crashed.exit_code() == -signal.SIGKILL
        assert (settings.layout.run_dir(run_id) / "deploy.json").exists()
        await worker(procs)
        run = await finished_run(client, run_id)
        assert run["status"] == "deployed" and run["new_version"] == 1, run
        assert current.readlink() == Path("versions/v1")
        versions = sorted(p.name for p in (settings.layout.kernel_dir("tiny") / "versions").iterdir())
        assert versions == ["v1"]  # no duplicate, no staging left behind
        seen = phases(settings, run_id)
        resumed_at = seen.index("resumed")
        trained_again = "training" in seen[resumed_at:]
        assert trained_again == (point == "deploying"), seen
        kernel = next(k for k in (await call(client, "list_kernels"))["kernels"] if k["name"] == "tiny")
        assert kernel["deployed_version"] == 1 and kernel["untrained"] == 0


async def test_kill_9_between_result_and_inbox_copy_still_ends_the_run(procs: Procs, tmp_path: Path) -> None:
    settings = Settings()
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        crashed = Faulty(procs, tmp_path, "kill:result")
        assert await crashed.exit_code() == -signal.SIGKILL
        run = await finished_run(client, run_id)
        assert run["status"] == "deployed"


@pytest.mark.parametrize("point", ["loading", "evaluating"])  # bench/faults.py: every phase
async def test_sigterm_in_each_phase_stops_the_run_and_it_resumes(procs: Procs, tmp_path: Path, point: str) -> None:
    settings = Settings()
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        paused = Faulty(procs, tmp_path, f"pause:{point}")
        await paused.reached()
        assert settings.layout.lease.exists() == (point != "stopping_host")
        # Timings are bench/faults.py's business (5 s there); here: it stopped, checkpointed, did not finish.
        assert await paused.stopped_by(signal.SIGTERM) == 75
        assert "interrupted" in phases(settings, run_id)
        state = read_model(settings.layout.run_dir(run_id) / "state.json", RunState)
        assert state.interruptions == 1 and state.host_restored
        assert not settings.layout.lease.exists()
        await worker(procs)
        run = await finished_run(client, run_id)
        assert run["status"] == "deployed", run


async def test_a_cancel_during_evaluation_is_honoured(procs: Procs, tmp_path: Path) -> None:
    settings = Settings()
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        paused = Faulty(procs, tmp_path, "pause:evaluating")
        await paused.reached()
        view = await call(client, "cancel_training", run_id=run_id)
        assert view["cancel_requested"] is True
        assert await paused.exit_code() == 0
        run = await finished_run(client, run_id)
        assert run["status"] == "cancelled" and "evaluating" in run["error"]
        assert not (settings.layout.kernel_dir("tiny") / "current").exists()


async def test_a_cancel_after_the_deploy_committed_is_refused_and_the_run_deploys(
    procs: Procs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings()
    asking = threading.Event()
    ask = dispatch._ask_worker_to_cancel

    def asking_then_ask(*args: Any) -> str | None:
        asking.set()
        return ask(*args)

    monkeypatch.setattr(dispatch, "_ask_worker_to_cancel", asking_then_ask)
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        paused = Faulty(procs, tmp_path, "pause:deploying")
        await paused.reached()
        refused: list[str] = []

        async def cancel() -> None:
            refused.append(await error(client, "cancel_training", run_id=run_id))

        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel)  # it waits for the kernel lock the deploy holds, then decides
            assert await in_thread(lambda: asking.wait(60))
            paused.ready.unlink()  # let the deploy go on
        assert "can no longer be cancelled" in refused[0]
        assert await paused.exit_code() == 0
        run = await finished_run(client, run_id)
        assert run["status"] == "deployed" and not run["cancel_requested"]


async def test_a_rollback_during_a_run_is_not_undone_by_its_deploy(procs: Procs, tmp_path: Path) -> None:
    settings = Settings()
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        paused = Faulty(procs, tmp_path, "pause:evaluating")
        await paused.reached()
        # Meanwhile an operator serves another version (a rollback, or another home's tool).
        fake_version(layout, "tiny", 7, "r-20261123T200000-000007")
        await call(client, "rollback_kernel", kernel="tiny", version=7)
        paused.ready.unlink()
        assert await paused.exit_code() == 0
        run = await finished_run(client, run_id)
        assert run["status"] == "rejected" and "moved from the bare base model to v7" in run["error"]
        assert (layout.kernel_dir("tiny") / "current").readlink() == Path("versions/v7")
        kernel = next(k for k in (await call(client, "list_kernels"))["kernels"] if k["name"] == "tiny")
        assert kernel["deployed_version"] == 7 and kernel["untrained"] == len(FACTS)


async def test_estop_holds_a_pending_run_and_pauses_a_running_one(procs: Procs, tmp_path: Path) -> None:
    settings = Settings()
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        layout.estop.write_text("maintenance\n")
        waiting = procs.start("worker", log="worker-estop", **NO_HOST)
        await in_thread(lambda: wait_for(lambda: "e-stop" in procs.log("worker-estop"), within=60, what="the hold"))
        assert layout.pending.exists() and waiting.poll() is None, "a run was claimed under the e-stop"
        waiting.send_signal(signal.SIGTERM)
        assert await in_thread(lambda: waiting.wait(60)) in (0, 75)
        layout.estop.unlink()
        # A running run: the e-stop interrupts it at its next check and it waits, then resumes.
        paused = Faulty(procs, tmp_path, "pause:training")
        await paused.reached()
        layout.estop.write_text("maintenance\n")
        await in_thread(lambda: wait_for(lambda: "held" in phases(settings, run_id), within=60, what="held"))
        assert not layout.lease.exists()  # the host gets its memory back while the run is held
        layout.estop.unlink()
        assert await paused.exit_code() == 0
        run = await finished_run(client, run_id)
        assert run["status"] == "deployed", run
        seen = phases(settings, run_id)
        assert seen.index("interrupted") < seen.index("held") and "resumed" in seen


async def test_a_full_disk_while_deploying_fails_the_run_and_changes_nothing_served(
    procs: Procs, tmp_path: Path
) -> None:
    """bench/faults.py does the same over a served version, asking the host before and after."""
    settings = Settings()
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        run_id = await new_run(client)
        crashed = Faulty(procs, tmp_path, "enospc:deploying")
        assert await crashed.exit_code() == 0
        run = await finished_run(client, run_id)
        assert run["status"] == "failed" and "No space left on device" in run["error"], run
        assert not (layout.kernel_dir("tiny") / "current").exists()
        versions = layout.kernel_dir("tiny") / "versions"
        assert not versions.exists() or list(versions.iterdir()) == []
        assert not (layout.run_dir(run_id) / "deploy.json").exists()
        kernel = next(k for k in (await call(client, "list_kernels"))["kernels"] if k["name"] == "tiny")
        assert kernel["deployed_version"] is None and kernel["untrained"] == len(FACTS)


async def test_a_diverging_run_fails_with_a_clear_error(procs: Procs, tmp_path: Path) -> None:
    settings = Settings()
    async with Client(create_server(settings)) as client:
        # Decoupled weight decay of lr x wd = 1000 per step multiplies the adapter by -999 each step: inf by step 13.
        wild = TINY | {"learning_rate": 10.0, "weight_decay": 100.0, "max_epochs": 30, "early_stop_em": None}
        run_id = await new_run(client, kernel="wild", settings=wild)
        await worker(procs)
        run = await finished_run(client, run_id)
        assert run["status"] == "failed" and "diverged" in run["error"] and "learning_rate" in run["error"], run
        assert not (settings.layout.run_dir(run_id) / "checkpoints").exists()


async def test_a_torn_batch_is_quarantined_and_the_run_ends_with_the_reason(procs: Procs) -> None:
    settings = Settings()
    layout = settings.layout
    async with Client(create_server(settings)) as client:
        await call(client, "create_kernel", name="tiny", settings=TINY, gates=LENIENT)
        await call(client, "record_experiences", kernel="tiny", items=FACTS)
        run_id = (await call(client, "train_model", kernel="tiny"))["run_id"]
        batch = layout.run_dir(run_id) / "batch.jsonl"
        batch.write_bytes(batch.read_bytes()[:-20])  # torn
        (layout.run_dir(run_id) / "state.json").write_text("{not json")
        await worker(procs)
        run = await finished_run(client, run_id)
        assert run["status"] == "failed" and "sha256" in run["error"]
        reasons = " ".join(p.read_text() for p in layout.quarantine.glob("*.reason.txt"))
        assert "state.json" in reasons and "sha256" in reasons
        await anyio.sleep(0.5)
        assert not layout.pending.exists()  # no loop: the run is over
