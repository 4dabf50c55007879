"""One command gives a working system: `engrain serve` starts host and watcher; `engrain up` runs both."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.procs import ENGRAIN, Procs, host_health, processes, wait_for
from tests.test_server_tools import call
from tests.test_worker import FACTS, LENIENT, TINY, finished_run
from train_worker.locks import host_lock, watcher_lock
from train_worker.settings import Settings


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.anyio
async def test_serve_starts_host_and_watcher_that_outlive_the_session(tiny_env: dict[str, str], tmp_path: Path) -> None:
    settings = Settings()
    env = tiny_env | {"ENGRAIN_EMBEDDED_SERVICES": "true", "ENGRAIN_HOST_CONTROLLER": "lease", "OMP_NUM_THREADS": "1"}
    params = StdioServerParameters(command=ENGRAIN, args=["serve"], env=env)
    port = int(env["ENGRAIN_HOST_PORT"])
    host, watcher = host_lock(settings.layout.locks), watcher_lock(settings.layout.locks)
    try:
        with (tmp_path / "serve.log").open("w") as err:
            async with Client(stdio_client(params, errlog=err)) as client:
                await call(client, "create_kernel", name="tiny", settings=TINY, gates=LENIENT)
                await call(client, "record_experiences", kernel="tiny", items=FACTS)
                run_id = (await call(client, "train_model", kernel="tiny"))["run_id"]
                # No worker was started by hand: the embedded watcher picks the request up.
                run = await finished_run(client, run_id, within=240)
                assert run["status"] == "deployed", run
                answer = await call(client, "query_kernel", kernel="tiny", prompt="Code f1?", max_new_tokens=12)
                assert answer["version"] == 1 and "kel" in answer["response"]
        # The stdio session is over; the services it started are not.
        assert host.held_elsewhere() and watcher.held_elsewhere()
        assert _alive(host.holder()) and _alive(watcher.holder())
        assert (host_health(port) or {}).get("status") == "ok"
        # A second server start does not start a second host or watcher.
        async with Client(stdio_client(params, errlog=(tmp_path / "serve2.log").open("w"))) as client:
            await call(client, "list_kernels")
        assert (settings.layout.logs / "host.log").read_text().count("model host on") == 1
    finally:
        for lock in (host, watcher):
            pid = lock.holder()
            if _alive(pid):
                os.kill(pid or 0, signal.SIGTERM)
        await anyio.to_thread.run_sync(lambda: wait_for(lambda: not host.held_elsewhere(), within=30))


def test_up_runs_host_and_watcher_and_ctrl_c_stops_both(tiny_env: dict[str, str], tmp_path: Path) -> None:
    settings = Settings()
    port = int(tiny_env["ENGRAIN_HOST_PORT"])
    procs: Procs
    with processes(tmp_path / "logs", tiny_env) as procs:
        up = procs.start("up")
        wait_for(lambda: (host_health(port) or {}).get("status") == "ok", what="the host under engrain up")
        wait_for(lambda: watcher_lock(settings.layout.locks).held_elsewhere(), what="the watcher under engrain up")
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        assert not host_lock(settings.layout.locks).held_elsewhere()
        assert not watcher_lock(settings.layout.locks).held_elsewhere()
        assert host_health(port) is None
