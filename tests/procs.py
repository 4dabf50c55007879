"""Real processes for tests: start `engrain <command>` subprocesses, wait for them, always clean up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ENGRAIN = str(Path(sys.executable).with_name("engrain"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Procs:
    """Starts subprocesses with logs under a folder, and kills whatever is left at the end."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs = logs
        self.env = env
        self.started: list[subprocess.Popen[bytes]] = []
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, *args: str, log: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        out = (self.logs / f"{log or args[0]}.log").open("ab")
        proc = subprocess.Popen(
            [ENGRAIN, *args], env={**os.environ, **self.env, **env}, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()
        self.started.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ENGRAIN, *args], env={**os.environ, **self.env, **env}, capture_output=True, text=True, timeout=timeout
        )

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.started:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def processes(logs: Path, env: dict[str, str]) -> Iterator[Procs]:
    procs = Procs(logs, env)
    try:
        yield procs
    finally:
        procs.cleanup()


def tiny_env_vars(home: Path, model_dir: Path) -> dict[str, str]:
    """ENGRAIN_* for real processes over the tiny model in `home`."""
    return {
        "ENGRAIN_HOME": str(home),
        "ENGRAIN_BASE_MODEL": str(model_dir),
        "ENGRAIN_HOST_PORT": str(free_port()),
        "ENGRAIN_EMBEDDED_SERVICES": "false",
        "ENGRAIN_HOST_CONTROLLER": "lease",
        "HF_HUB_OFFLINE": "1",
        # The tiny model gains nothing from threads, and two-thread processes side by side spin-wait.
        "ENGRAIN_TORCH_THREADS": "1",
        "OMP_NUM_THREADS": "1",
    }


def wait_for(check: Callable[[], Any], within: float = 60, every: float = 0.1, what: str = "condition") -> Any:
    """Blocking poll for tests that drive subprocesses."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {within:.0f} s waiting for {what}")


def host_health(port: int, home: Path | None = None) -> dict[str, Any] | None:
    """The /health of the host on `port`, asked with the token of `home` (default: $ENGRAIN_HOME's)."""
    from train_worker.auth_token import load_or_create_token
    from train_worker.settings import Settings

    token, _ = load_or_create_token(Settings(home=home) if home else Settings())
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Authorization": f"Bearer {token}"}, timeout=2)
    except httpx.HTTPError:
        return None
    return dict(response.json()) if response.status_code == 200 else None
