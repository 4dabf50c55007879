"""Freeing the model host's memory before training, and bringing it back afterwards.

- `systemd`: `systemctl [--user] stop|start engrain-host.service`.
- `http`: the host's token-protected `POST /admin/unload` and `/admin/reload` (the embedded default).
- `none`: leave the host alone (for machines with memory to spare).
- `auto`: systemd when the unit is installed, else http.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from typing import Protocol

import httpx

from train_worker.auth_token import load_or_create_token
from train_worker.protocol import HostAction
from train_worker.settings import Settings

log = logging.getLogger(__name__)

HOST_UNIT = "engrain-host.service"


class HostController(Protocol):
    name: str

    def stop(self) -> HostAction: ...

    def start(self, action: HostAction) -> bool:
        """Undo `action`; True when the host is serving again (or was never ours to stop)."""
        ...


class NoHost:
    name = "none"

    def stop(self) -> HostAction:
        return "left_alone"

    def start(self, action: HostAction) -> bool:
        return True


class SystemdHost:
    name = "systemd"

    def __init__(self, user: bool) -> None:
        self._base = ["systemctl", "--user"] if user else ["systemctl"]

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._base, *args], capture_output=True, text=True, timeout=120, check=False)

    def stop(self) -> HostAction:
        if self._run("is-active", "--quiet", HOST_UNIT).returncode != 0:
            return "not_running"
        done = self._run("stop", HOST_UNIT)
        if done.returncode != 0:
            raise HostControlError(f"systemctl stop {HOST_UNIT} failed: {done.stderr.strip()}")
        return "stopped"

    def start(self, action: HostAction) -> bool:
        if action != "stopped":
            return True
        done = self._run("start", HOST_UNIT)
        if done.returncode != 0:
            log.error("systemctl start %s failed: %s", HOST_UNIT, done.stderr.strip())
        return done.returncode == 0


class HttpHost:
    name = "http"

    def __init__(self, base_url: str, token: str) -> None:
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}

    def _post(self, path: str) -> httpx.Response:
        return httpx.post(f"{self._base}{path}", headers=self._headers, timeout=120)

    def stop(self) -> HostAction:
        try:
            response = self._post("/admin/unload")
        except httpx.ConnectError:
            return "not_running"
        if response.status_code != 200:
            raise HostControlError(f"the host refused to unload ({response.status_code}): {response.text}")
        return "unloaded"

    def start(self, action: HostAction) -> bool:
        if action != "unloaded":
            return True
        try:
            response = self._post("/admin/reload")
        except httpx.HTTPError as exc:
            log.error("could not ask the host at %s to reload: %s", self._base, exc)
            return False
        if response.status_code != 200:
            log.error("the host refused to reload (%s): %s", response.status_code, response.text)
        return response.status_code == 200


class HostControlError(Exception):
    pass


def systemd_unit_installed(user: bool) -> bool:
    if shutil.which("systemctl") is None:
        return False
    cmd = ["systemctl", "--user"] if user else ["systemctl"]
    try:
        found = subprocess.run([*cmd, "cat", HOST_UNIT], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return found.returncode == 0


def controller_for(settings: Settings) -> HostController:
    kind = settings.host_controller
    if kind == "auto":
        kind = "systemd" if systemd_unit_installed(settings.systemd_user) else "http"
    if kind == "systemd":
        return SystemdHost(settings.systemd_user)
    if kind == "http":
        token, _ = load_or_create_token(settings)
        return HttpHost(f"http://{settings.host_address}:{settings.host_port}", token)
    return NoHost()
