"""The systemd units: verified by systemd-analyze, and each ExecStart= run the way the unit runs it.

systemd is not PID 1 here, so units cannot be started; what a unit would do is reproduced faithfully:
its command line, under its Environment= and WorkingDirectory=, triggered by the files its .path unit
watches (see ../shared/notes/systemd.md).
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from server.app import create_server
from server.systemd_units import UNITS, render
from tests.procs import free_port, host_health, wait_for
from tests.test_server_tools import call
from tests.test_worker import FACTS, LENIENT, TINY, finished_run
from train_worker.settings import Settings
from train_worker.watch import has_work

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def parse(text: str) -> dict[str, list[str]]:
    """Unit file keys to their values, in order (repeatable keys keep every value)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def write_units(folder: Path, units: dict[str, str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in units.items():
        (folder / name).write_text(text)
        paths.append(folder / name)
    return paths


def verify(paths: list[Path], tmp_path: Path, user: bool) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "xdg-runtime"
    runtime.mkdir(exist_ok=True)
    scope = ["--user"] if user else []
    return subprocess.run(
        [ANALYZE or "systemd-analyze", *scope, "verify", "--man=no", *map(str, paths)],
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@needs_analyze
@pytest.mark.parametrize("user", [True, False], ids=["user-units", "system-units"])
def test_rendered_units_pass_systemd_analyze_verify(settings: Settings, tmp_path: Path, user: bool) -> None:
    settings.layout.ensure()
    units = render(settings, user=user)
    assert set(units) == set(UNITS)
    for text in units.values():
        assert "@" not in text.replace("@users", ""), "a placeholder was left unrendered"
        assert str(settings.layout.home) in text
    done = verify(write_units(tmp_path / "units", units), tmp_path, user)
    assert done.returncode == 0, done.stderr


@needs_analyze
def test_verify_catches_a_broken_unit(settings: Settings, tmp_path: Path) -> None:
    """The check above can fail: a unit whose ExecStart is not executable is refused."""
    units = render(settings, user=True)
    units["engrain-host.service"] = units["engrain-host.service"].replace(
        "ExecStart=", "ExecStart=/nonexistent/engrain-", 1
    )
    done = verify(write_units(tmp_path / "units", units), tmp_path, True)
    assert done.returncode != 0 and "nonexistent" in done.stderr


def test_the_path_unit_watches_what_the_watcher_watches(settings: Settings) -> None:
    layout = settings.layout
    layout.ensure()
    path_unit = parse(render(settings, user=True)["engrain-train.path"])
    [exists] = path_unit["PathExists"]
    [glob] = path_unit["PathExistsGlob"]
    assert Path(exists) == layout.pending and path_unit["Unit"] == ["engrain-train.service"]

    def unit_triggers() -> bool:
        return Path(exists).exists() or any(fnmatch.fnmatch(str(p), glob) for p in layout.active.iterdir())

    assert not unit_triggers() and not has_work(settings)
    layout.pending.write_text("{}")
    assert unit_triggers() and has_work(settings)
    layout.pending.unlink()
    (layout.active / "r-20261123T200000-abcdef").write_text("")
    assert unit_triggers() and has_work(settings)


def exec_line(unit_text: str, key: str = "ExecStart") -> tuple[list[str], dict[str, str], Path]:
    """A unit's command line, environment and working directory, as systemd would use them."""
    unit = parse(unit_text)
    env = dict(value.split("=", 1) for value in unit.get("Environment", []))
    [workdir] = unit["WorkingDirectory"]
    return shlex.split(unit[key][0]), env, Path(workdir)


@pytest.mark.anyio
async def test_each_exec_start_runs_as_its_unit_would(tiny_env: dict[str, str], tmp_path: Path) -> None:
    settings = Settings()
    settings.layout.ensure()
    host_port, mcp_port = int(tiny_env["ENGRAIN_HOST_PORT"]), free_port()
    # Units carry only ENGRAIN_HOME; the rest comes from the config file there, as for an operator.
    (settings.layout.home / "config.toml").write_text(
        f'base_model = "{tiny_env["ENGRAIN_BASE_MODEL"]}"\nhost_port = {host_port}\nmcp_port = {mcp_port}\n'
        "torch_threads = 1\n"
    )
    units = render(settings, user=True)
    # Only PATH and HOME from outside: a unit starts from a near-empty environment.
    base_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "OMP_NUM_THREADS": "1"}
    running: list[subprocess.Popen[bytes]] = []

    def start(unit: str) -> subprocess.Popen[bytes]:
        argv, env, cwd = exec_line(units[unit])
        log = (tmp_path / f"{unit}.log").open("wb")
        proc = subprocess.Popen(argv, env=base_env | env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        running.append(proc)
        return proc

    def run(unit: str, key: str = "ExecStart") -> subprocess.CompletedProcess[str]:
        argv, env, cwd = exec_line(units[unit], key)
        return subprocess.run(argv, env=base_env | env, cwd=cwd, capture_output=True, text=True, timeout=600)

    try:
        start("engrain-host.service")
        await anyio.to_thread.run_sync(
            lambda: wait_for(lambda: (host_health(host_port) or {}).get("status") == "ok", what="engrain-host")
        )
        start("engrain-mcp.service")
        url = f"http://127.0.0.1:{mcp_port}/mcp"
        await anyio.to_thread.run_sync(lambda: wait_for(lambda: _answers(url), what="engrain-mcp"))
        async with httpx.AsyncClient() as http:
            assert (await http.post(url, json={})).status_code == 401  # the HTTP service requires its token

        async with Client(create_server(settings)) as client:
            await call(client, "create_kernel", name="tiny", settings=TINY, gates=LENIENT)
            await call(client, "record_experiences", kernel="tiny", items=FACTS)
            run_id = (await call(client, "train_model", kernel="tiny"))["run_id"]
            assert has_work(settings)  # the path unit would fire now
            worker = await anyio.to_thread.run_sync(lambda: run("engrain-train.service"))
            assert worker.returncode == 0, worker.stderr[-3000:]
            stop_post = await anyio.to_thread.run_sync(lambda: run("engrain-train.service", "ExecStopPost"))
            assert stop_post.returncode == 0, stop_post.stderr[-2000:]
            run_view: dict[str, Any] = await finished_run(client, run_id)
            assert run_view["status"] == "deployed"
            assert not has_work(settings)  # and would not fire again
        # With systemd as the controller but no systemd running, the worker left the host alone.
        assert (host_health(host_port) or {}).get("status") == "ok"
    finally:
        for proc in running:
            proc.terminate()
            proc.wait(20)


def _answers(url: str) -> bool:
    try:
        httpx.post(url, json={}, timeout=1)
    except httpx.HTTPError:
        return False
    return True


def test_installing_units_for_a_second_home_is_refused_with_the_reason(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from server.systemd_units import install

    folder = tmp_path / "units"
    assert install(settings, user=True, dry_run=False, target=folder, enable=False) == 0
    other = Settings(home=tmp_path / "other-home")
    assert install(other, user=True, dry_run=False, target=folder, enable=False) == 1
    assert "serve the home" in caplog.text and str(settings.layout.home) in caplog.text
    assert f"ENGRAIN_HOME={settings.layout.home}" in (folder / "engrain-host.service").read_text()
    assert install(settings, user=True, dry_run=False, target=folder, enable=False) == 0  # the same home: fine


def fake_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> Path:
    """Put a `systemctl` first on PATH that records its arguments and then runs `body`; returns the record."""
    fake = tmp_path / "bin"
    fake.mkdir()
    calls = tmp_path / "calls.txt"
    script = fake / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{body}')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    return calls


def test_a_worker_leaves_another_homes_host_unit_alone(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With systemd, home B's worker used to stop home A's host unit."""
    from train_worker.host_control import SystemdHost

    calls = fake_systemctl(
        tmp_path, monkeypatch, 'case "$*" in *show*) echo "ENGRAIN_HOME=/somewhere/else HF_HUB_OFFLINE=1";; esac\n'
    )
    action = SystemdHost(user=True, home=settings.layout.home).stop()
    assert action == "left_alone"
    assert "stop" not in calls.read_text().split()


def test_a_stop_that_times_out_neither_fails_the_run_nor_leaves_the_host_down(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`systemctl stop` timing out used to fail the run, and the queued stop then left the host down."""
    import train_worker.host_control as host_control

    calls = fake_systemctl(tmp_path, monkeypatch, 'case "$*" in *is-active*) exit 0;; *" stop "*) sleep 30;; esac\n')
    monkeypatch.setattr(host_control, "SYSTEMCTL_TIMEOUT_S", 1.0)
    controller = host_control.SystemdHost(user=True, home=settings.layout.home)
    assert controller.stop() == "stopped"  # went on, and recorded what to undo
    assert controller.start("stopped") is True
    assert "start --no-block engrain-host.service" in calls.read_text()
