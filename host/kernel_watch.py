"""Follows each kernel's `current` link, so a deploy or rollback is served within half a second."""

from __future__ import annotations

import functools
import threading

from host.engine import Engine
from train_worker.deploy import DeployError, KernelFiles


class KernelWatcher(threading.Thread):
    """Polls each kernel's `current` link and loads a new version at once, so no query waits for it."""

    def __init__(self, engine: Engine, interval: float = 0.5) -> None:
        super().__init__(name="engrain-kernel-watch", daemon=True)
        self._engine = engine
        self._interval = interval

    def run(self) -> None:
        engine = self._engine
        while not engine.stopped.wait(self._interval):
            if engine.status != "ok" or not engine.layout.kernels.is_dir():
                continue
            resident = engine.resident()
            for folder in engine.layout.kernels.iterdir():
                try:
                    version = KernelFiles(engine.layout, folder.name).current()
                except DeployError:
                    continue
                if resident.get(folder.name) != version and (version is not None or folder.name in resident):
                    engine.call(functools.partial(engine.sync, folder.name)).result()
