"""What a worker does to the model host besides holding its training lease (`train_worker/lease.py`).

- `lease` (the default without systemd units): nothing more; the host unloads itself while the lease is
  held and reloads itself once it is released or its holder dies.
- `systemd`: also `systemctl [--user] stop` the host unit before training (which frees GPU memory for
  certain) and `start --no-block` it afterwards. A stop that times out or fails is not a failed run: the
  worker goes on with a warning and starts the unit again afterwards. A unit that serves another home is
  left alone.
- `http`: also the host's token-protected `POST /admin/unload` and `/admin/reload`; failures only warn.
- `none`: leave the host alone, no lease either (for machines with memory to spare).
- `auto`: systemd when the unit is installed, else lease.

No controller call may make a run fail, and none can leave the host down: the lease is released on every
way out of a run, and `engrain worker --restore-host` (ExecStopPost, the watcher) undoes a stopped unit.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import httpx

from train_worker.auth_token import load_or_create_token
from train_worker.lease import host_endpoint
from train_worker.protocol import HostAction
from train_worker.settings import Layout, Settings

log = logging.getLogger(__name__)

HOST_UNIT = "engrain-host.service"
SYSTEMCTL_TIMEOUT_S = 120.0


class HostController(Protocol):
    name: str
    uses_lease: bool

    def stop(self, check: Callable[[], None] = lambda: None) -> HostAction:
        """Free the host's memory; `check` is called while waiting and raises when the run must stop."""
        ...

    def start(self, action: HostAction) -> bool:
        """Undo `action`; True when the host is (being) brought back, or was never ours to stop."""
        ...


class LeaseHost:
    name = "lease"
    uses_lease = True

    def stop(self, check: Callable[[], None] = lambda: None) -> HostAction:
        return "leased"

    def start(self, action: HostAction) -> bool:
        return True


class NoHost:
    name = "none"
    uses_lease = False

    def stop(self, check: Callable[[], None] = lambda: None) -> HostAction:
        return "left_alone"

    def start(self, action: HostAction) -> bool:
        return True


class SystemdHost:
    name = "systemd"
    uses_lease = True

    def __init__(self, user: bool, home: Path) -> None:
        self._base = ["systemctl", "--user"] if user else ["systemctl"]
        self._home = home

    def _run(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self._base, *args], capture_output=True, text=True, timeout=timeout, check=False)

    def serves_another_home(self) -> str | None:
        """The other home the unit's ENGRAIN_HOME names, if it is not ours (two homes, one unit name)."""
        try:
            shown = self._run("show", "--property=Environment", "--value", HOST_UNIT)
        except (OSError, subprocess.TimeoutExpired):
            return None
        for word in shown.stdout.split():
            if word.startswith("ENGRAIN_HOME="):
                theirs = Path(word.split("=", 1)[1]).expanduser()
                if theirs.resolve() != self._home:
                    return str(theirs)
        return None

    def stop(self, check: Callable[[], None] = lambda: None) -> HostAction:
        other = self.serves_another_home()
        if other is not None:
            log.error(
                "%s serves the home %s, not this one (%s); leaving it alone. Give each home its own units "
                "(ENGRAIN_HOST_CONTROLLER=lease for this one).",
                HOST_UNIT,
                other,
                self._home,
            )
            return "left_alone"
        try:
            if self._run("is-active", "--quiet", HOST_UNIT).returncode != 0:
                return "not_running"
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("could not ask systemd about %s (%s); training anyway", HOST_UNIT, exc)
            return "stopped"  # so it is started again afterwards, whatever state it is in
        proc = subprocess.Popen(
            [*self._base, "stop", HOST_UNIT], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + SYSTEMCTL_TIMEOUT_S
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                log.warning("systemctl stop %s took over %.0f s; training anyway", HOST_UNIT, SYSTEMCTL_TIMEOUT_S)
                return "stopped"
            check()  # a SIGTERM or cancel leaves systemctl to finish on its own
            time.sleep(0.1)
        if proc.returncode != 0:
            err = proc.stderr.read().strip() if proc.stderr else ""
            log.warning("systemctl stop %s failed (%s); training anyway", HOST_UNIT, err)
        return "stopped"

    def start(self, action: HostAction) -> bool:
        if action != "stopped":
            return True
        try:
            # --no-block: queue the start and return; a slow start cannot time out the worker.
            done = self._run("start", "--no-block", HOST_UNIT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.error("systemctl start %s failed: %s", HOST_UNIT, exc)
            return False
        if done.returncode != 0:
            log.error("systemctl start %s failed: %s", HOST_UNIT, done.stderr.strip())
        return done.returncode == 0


class HttpHost:
    name = "http"
    uses_lease = True

    def __init__(self, layout: Layout, token: str, timeout: float) -> None:
        self._layout = layout
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = max(timeout, 1.0)

    @property
    def _base(self) -> str | None:
        endpoint = host_endpoint(self._layout)  # this home's host, wherever it listens now
        return endpoint.url.rstrip("/") if endpoint is not None else None

    def _post(self, path: str) -> httpx.Response:
        if self._base is None:
            raise httpx.ConnectError(f"no host.json in {self._layout.home}: no host is running")
        return httpx.post(f"{self._base}{path}", headers=self._headers, timeout=self._timeout)

    def stop(self, check: Callable[[], None] = lambda: None) -> HostAction:
        try:
            response = self._post("/admin/unload")
        except httpx.ConnectError:
            return "not_running"
        except httpx.HTTPError as exc:
            log.warning("the host did not unload in time (%s); training anyway, the lease holds it down", exc)
            return "unloaded"
        if response.status_code != 200:
            log.warning("the host refused to unload (%s): %s; training anyway", response.status_code, response.text)
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
        kind = "systemd" if systemd_unit_installed(settings.systemd_user) else "lease"
    if kind == "systemd":
        return SystemdHost(settings.systemd_user, settings.layout.home)
    if kind == "http":
        token, _ = load_or_create_token(settings)
        return HttpHost(settings.layout, token, settings.host_unload_wait_s)
    if kind == "lease":
        return LeaseHost()
    return NoHost()
