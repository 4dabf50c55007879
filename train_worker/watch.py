"""`engrain watch`: start a worker whenever there is work and no worker alive, like the systemd path unit.

Work is `requests/pending.json` (a new request) or a marker in `requests/active/` (a claimed run whose
worker died or was stopped: it resumes from its checkpoint). A worker that died without cleaning up
leaves the model host down; the watcher brings it back, as `ExecStopPost=` does under systemd.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from train_worker.locks import watcher_lock, worker_lock
from train_worker.settings import Settings
from train_worker.worker import EXIT_INTERRUPTED, restore_host_after_crash

log = logging.getLogger(__name__)

WORKER_COMMAND: Sequence[str] = (sys.executable, "-m", "server.cli", "worker")


def has_work(settings: Settings) -> bool:
    layout = settings.layout
    return layout.pending.exists() or any(layout.active.glob("r-*"))


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._event.set()


class Watcher:
    def __init__(self, settings: Settings, command: Sequence[str] = WORKER_COMMAND, poll: float = 5.0) -> None:
        self.settings = settings
        self.command = list(command)
        self.poll = poll
        self._wake = threading.Event()
        self._stopping = False
        self._child: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        layout = self.settings.layout
        layout.ensure()
        lock = watcher_lock(layout.locks)
        if not lock.acquire():
            log.warning("another watcher (pid %s) is already running; this one exits", lock.holder())
            return 0
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        observer = Observer()
        observer.schedule(_Wake(self._wake), str(layout.requests), recursive=True)
        observer.start()
        log.info("watching %s for training requests", layout.requests)
        try:
            failures = 0
            while not self._stopping:
                if has_work(self.settings) and not worker_lock(layout.locks).held_elsewhere():
                    rc = self._run_worker()
                    failures = 0 if rc in (0, EXIT_INTERRUPTED) else failures + 1
                    if failures:
                        # A worker that keeps failing must not spin: back off, bounded. The run's own file
                        # events (its claim moves the request) must not cut the backoff short; a stop signal,
                        # before the clear or after it, still does.
                        self._wake.clear()
                        if not self._stopping:
                            self._wake.wait(min(60.0, 2.0**failures))
                    continue
                self._wake.wait(self.poll)
                self._wake.clear()
            return 0
        finally:
            observer.stop()
            observer.join(5)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            lock.release()

    def _run_worker(self) -> int:
        started = time.monotonic()
        self._child = subprocess.Popen(self.command)
        rc = self._child.wait()
        self._child = None
        log.info("worker exited with %s after %.0f s", rc, time.monotonic() - started)
        # Killed or crashed: it could not bring the host back itself.
        if rc not in (0, EXIT_INTERRUPTED) and not restore_host_after_crash(self.settings):
            log.error("the model host could not be brought back; see its log")
        return rc

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        self._wake.set()
        child = self._child
        if child is not None and child.poll() is None:
            # The worker checkpoints on SIGTERM; wait for it in _run_worker.
            child.send_signal(signal.SIGTERM)
