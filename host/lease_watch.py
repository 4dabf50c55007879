"""The host owns its unloading: while a live training lease exists it is unloaded, and it reloads itself
when the lease is released, goes stale, or its holder dies. No crash, timeout or missing watcher can
therefore leave it down."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from host.engine import Engine
from host.log_once import LogOnce
from train_worker.protocol import ProtocolError, TrainingLease, read_model

log = logging.getLogger(__name__)

RETRY_S = (5.0, 10.0, 30.0, 60.0)  # a reload that failed (the run's memory not yet freed) is tried again


def zombie(pid: int) -> bool:
    """A process that exited but was not reaped yet: `kill(pid, 0)` still finds it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


class LeaseWatcher(threading.Thread):
    def __init__(self, engine: Engine, interval: float = 0.5) -> None:
        super().__init__(name="engrain-lease-watch", daemon=True)
        self._engine = engine
        self._interval = interval
        self._problems = LogOnce(log)
        self._failures = 0
        self._retry_at = 0.0

    def live_lease(self) -> TrainingLease | None:
        path = self._engine.layout.lease
        if not path.exists():
            self._problems.clear("lease")
            return None
        try:
            lease = read_model(path, TrainingLease)
        except ProtocolError as exc:
            # The holder writes it atomically, so this is not a torn write; serving beats staying down.
            self._problems.problem("lease", f"ignoring {path}: {exc}")
            return None
        self._problems.clear("lease")
        if not lease.live() or zombie(lease.holder_pid):
            return None
        return lease

    def prime(self) -> bool:
        """Before the first load: True when a live lease exists, so the engine starts unloaded."""
        lease = self.live_lease()
        self._engine.lease = lease
        return lease is not None

    def check(self) -> None:
        engine = self._engine
        lease = self.live_lease()
        engine.lease = lease
        if lease is not None:
            self._failures = 0
            if engine.unloaded_by != "lease":
                log.info("training run %s (pid %d) holds the lease: unloading", lease.run_id, lease.holder_pid)
                engine.call(lambda: engine.unload("lease")).result()
        elif engine.unloaded_by == "lease" or (engine.status == "failed" and self._failures):
            if time.monotonic() < self._retry_at:
                return
            log.info("the training lease is gone: reloading")
            try:
                engine.call(engine.reload).result()
            except Exception:
                delay = RETRY_S[min(self._failures, len(RETRY_S) - 1)]
                self._failures += 1
                self._retry_at = time.monotonic() + delay
                log.exception("reloading after training failed; trying again in %.0f s", delay)
            else:
                self._failures = 0

    def run(self) -> None:
        while not self._engine.stopped.wait(self._interval):
            try:
                self.check()
                self._problems.clear("(check)")
            except Exception as exc:  # this thread is what brings the host back: it must never die
                self._problems.problem("(check)", f"the lease watcher hit an unexpected error: {exc}", exc_info=True)
