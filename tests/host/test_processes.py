"""The host as a real process on the tiny model: per-home endpoints, and the training lease it obeys."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from host.client import HostClient, HostError, HostUnavailable
from host.endpoint import home_id, read_endpoint
from tests.procs import Procs, processes, wait_for
from train_worker.auth_token import load_or_create_token
from train_worker.protocol import HostEndpoint, write_model
from train_worker.settings import Settings

# Writes the lease the way a worker does (its own pid, a heartbeat every second), then sleeps.
HOLDER = """
import sys, time
from datetime import UTC, datetime
from train_worker.protocol import TrainingLease, write_model
import os
path = sys.argv[1]
start = datetime.now(UTC)
while True:
    now = datetime.now(UTC)
    write_model(__import__("pathlib").Path(path), TrainingLease(
        holder_pid=os.getpid(), run_id="r-20261124T100000-abcdef", acquired_at=start, heartbeat_at=now, ttl_s=30))
    time.sleep(1)
"""


def client(settings: Settings) -> HostClient:
    return HostClient(settings.layout, load_or_create_token(settings)[0])


def health(settings: Settings) -> dict[str, Any]:
    found = anyio.run(client(settings).health)
    return found.model_dump() if found is not None else {}


def start_host(procs: Procs, settings: Settings, name: str = "host", **env: str) -> subprocess.Popen[bytes]:
    proc = procs.start("host", log=name, ENGRAIN_HOME=str(settings.layout.home), **env)
    wait_for(lambda: health(settings).get("status") == "ok", within=60, what=f"{name} to serve")
    return proc


@pytest.fixture
def procs(tiny_env: dict[str, str], tmp_path: Path) -> Any:
    with processes(tmp_path / "logs", tiny_env | {"ENGRAIN_HOST_PORT": "0"}) as p:
        yield p


def test_a_lease_unloads_the_host_and_a_killed_holder_brings_it_back(procs: Procs, settings: Settings) -> None:
    start_host(procs, settings)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(settings.layout.lease)])
    try:
        wait_for(lambda: health(settings).get("status") == "unloaded", within=60, what="the host to unload")
        assert health(settings)["training_run"] == "r-20261124T100000-abcdef"
        with pytest.raises(HostUnavailable, match="training run r-20261124T100000-abcdef"):
            anyio.run(client(settings).chat, "default", "Hi", None, 2)
        holder.send_signal(signal.SIGKILL)  # not reaped yet: the host must still see it as dead
        wait_for(lambda: health(settings).get("status") == "ok", within=60, what="the host to serve again")
        assert settings.layout.lease.exists()  # nobody cleaned up: the host judged the lease by its holder
        reply = anyio.run(client(settings).chat, "default", "Hi", None, 2)
        assert reply.usage.completion_tokens <= 2
    finally:
        holder.kill()
        holder.wait()


def test_a_host_started_under_a_live_lease_waits_for_it(procs: Procs, settings: Settings) -> None:
    settings.layout.ensure()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(settings.layout.lease)])
    try:
        wait_for(settings.layout.lease.exists, within=60, what="the lease")
        procs.start("host")
        wait_for(lambda: health(settings).get("status") == "unloaded", within=60, what="the host to listen")
        assert "host ready" not in procs.log("host")  # it never loaded the model
        holder.terminate()
        holder.wait()
        settings.layout.lease.unlink()  # a worker that ends normally removes its lease
        wait_for(lambda: health(settings).get("status") == "ok", within=60, what="the host to load")
    finally:
        holder.kill()
        holder.wait()


def test_two_homes_never_cross_talk(procs: Procs, settings: Settings, tmp_path: Path) -> None:
    other = Settings(home=tmp_path / "home-b")
    other.layout.ensure()
    shutil.copytree(settings.layout.home / "cache", other.layout.home / "cache")
    start_host(procs, settings, "host-a")
    start_host(procs, other, "host-b")
    a, b = read_endpoint(settings.layout), read_endpoint(other.layout)
    assert a is not None and b is not None and a.url != b.url  # port 0: each home got its own free port
    assert health(settings)["home_id"] == home_id(settings.layout) != health(other)["home_id"]

    # Home A's host.json pointing at home B's host (a stale file and a reused port): refused, clearly.
    write_model(settings.layout.host_endpoint, HostEndpoint(**(a.model_dump() | {"url": b.url})))
    with pytest.raises(HostError, match="refused this home's token"):
        anyio.run(client(settings).chat, "default", "Hi", None, 2)
    # The same token in both homes (one ENGRAIN_TOKEN for all): the identity check still tells them apart.
    same = HostClient(settings.layout, load_or_create_token(other)[0])
    with pytest.raises(HostError, match="serves another ENGRAIN_HOME"):
        anyio.run(same.chat, "default", "Hi", None, 2)


def test_a_taken_port_fails_at_once_with_the_reason(procs: Procs, settings: Settings) -> None:
    start_host(procs, settings, "first")
    endpoint = read_endpoint(settings.layout)
    assert endpoint is not None
    port = endpoint.url.rsplit(":", 1)[1]
    other = settings.layout.home.parent / "home-c"
    done = procs.run("host", timeout=60, ENGRAIN_HOME=str(other), ENGRAIN_HOST_PORT=port)
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken (ENGRAIN_HOST_PORT={port})" in done.stderr
    assert "host ready" not in done.stderr  # it refused before loading anything
    assert not (other / "host.json").exists()


def test_host_json_is_removed_on_a_clean_stop(procs: Procs, settings: Settings) -> None:
    proc = start_host(procs, settings)
    assert read_endpoint(settings.layout) is not None
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert read_endpoint(settings.layout) is None
    with pytest.raises(HostUnavailable, match="not running"):
        anyio.run(client(settings).chat, "default", "Hi", None, 2)


@pytest.mark.anyio
async def test_query_kernel_is_greedy_by_default_and_samples_on_request(procs: Procs, settings: Settings) -> None:
    from mcp import Client

    from server.app import create_server
    from tests.test_server_tools import call, error

    await anyio.to_thread.run_sync(start_host, procs, settings)
    async with Client(create_server(settings)) as mcp:
        ask = {"kernel": "default", "prompt": "Code f0?", "max_new_tokens": 12}
        greedy = [await call(mcp, "query_kernel", **ask) for _ in range(2)]
        assert greedy[0]["response"] == greedy[1]["response"]
        sampled = [await call(mcp, "query_kernel", **ask, temperature=1.0, seed=s) for s in (7, 7, 8, 9, 10)]
        assert sampled[0]["response"] == sampled[1]["response"]
        assert len({s["response"] for s in sampled}) > 1
        stopped = await call(mcp, "query_kernel", **ask, stop=[greedy[0]["response"][2:4]])
        assert len(stopped["response"]) < len(greedy[0]["response"]) and not stopped["truncated"]
        assert "stop" in await error(mcp, "query_kernel", **ask, stop=["a", "b", "c", "d", "e"])
        assert "temperature" in await error(mcp, "query_kernel", **ask, temperature=-1)
