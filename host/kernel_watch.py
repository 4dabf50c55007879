"""Follows each kernel's `current` link, so a deploy or rollback is served within half a second.

The thread survives every unexpected error (a stray file in `kernels/`, a `current` that is not a
link, a version trained on another base model): it logs each problem once and goes on.
"""

from __future__ import annotations

import functools
import logging
import threading

from host.engine import Engine
from host.log_once import LogOnce
from train_worker.protocol import check_kernel_name

log = logging.getLogger(__name__)


class KernelWatcher(threading.Thread):
    """Polls each kernel's `current` link and loads a new version at once, so no query waits for it."""

    def __init__(self, engine: Engine, interval: float = 0.5) -> None:
        super().__init__(name="engrain-kernel-watch", daemon=True)
        self._engine = engine
        self._interval = interval
        self._problems = LogOnce(log)

    def run(self) -> None:
        while not self._engine.stopped.wait(self._interval):
            try:
                self.scan()
                self._problems.clear("(scan)")
            except Exception as exc:
                self._problems.problem("(scan)", f"scanning kernels failed: {exc}", exc_info=True)

    def scan(self) -> None:
        engine = self._engine
        if engine.status != "ok" or not engine.layout.kernels.is_dir():
            return
        resident = engine.resident()
        for entry in sorted(engine.layout.kernels.iterdir()):
            try:
                if not entry.is_dir():
                    raise ValueError("not a kernel folder")
                name = check_kernel_name(entry.name)
                version = engine.deployed_version(name)
                if resident.get(name) != version and (version is not None or name in resident):
                    engine.call(functools.partial(engine.sync, name)).result()
            except Exception as exc:
                self._problems.problem(entry.name, f"kernels/{entry.name}: {exc}")
            else:
                self._problems.clear(entry.name)
