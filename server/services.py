"""The embedded default: with no systemd units installed, `engrain serve` starts the host and the watcher.

They run detached (their own session, logs under `$ENGRAIN_HOME/logs/`), so they outlive the stdio
session that started them. Each takes its own lock file on start, so racing servers never run two.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from train_worker.host_control import systemd_unit_installed
from train_worker.locks import host_lock, watcher_lock
from train_worker.settings import Settings

log = logging.getLogger(__name__)


def spawn_detached(settings: Settings, command: str) -> int:
    """Start `engrain <command>` in its own session with output to logs/<command>.log; return its pid."""
    logs = settings.layout.logs
    settings.layout.ensure()
    fd = os.open(logs / f"{command}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "ENGRAIN_HOME": str(settings.layout.home)},
        )
    return proc.pid


def ensure_services(settings: Settings) -> list[str]:
    """Start whichever of host and watcher is not running; return what was started."""
    if not settings.embedded_services:
        return []
    if systemd_unit_installed(settings.systemd_user):
        log.info("systemd units are installed; leaving the host and worker to systemd")
        return []
    started = []
    for name, lock in (("host", host_lock(settings.layout.locks)), ("watch", watcher_lock(settings.layout.locks))):
        if not lock.held_elsewhere():
            pid = spawn_detached(settings, name)
            log.info(
                "started the %s in the background (pid %d, log %s)", name, pid, settings.layout.logs / f"{name}.log"
            )
            started.append(name)
    return started
