"""`engrain host`: the model host process, in the foreground until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import uvicorn

from host.app import create_app
from host.engine import Engine
from host.kernel_watch import KernelWatcher
from host.transformers_backend import TransformersBackend
from train_worker.auth_token import load_or_create_token
from train_worker.locks import host_lock
from train_worker.settings import Settings

log = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Run the host until SIGTERM/SIGINT; 0 on a clean stop."""
    settings.layout.ensure()
    lock = host_lock(settings.layout.locks)
    if not lock.acquire():
        log.warning("a model host (pid %s) is already running; this one exits", lock.holder())
        return 0
    try:
        token, _ = load_or_create_token(settings)
        engine = Engine(settings, TransformersBackend(settings))
        engine.start()
        KernelWatcher(engine).start()
        config = uvicorn.Config(
            create_app(engine, token),
            host=settings.host_address,
            port=settings.host_port,
            log_level="warning",
            access_log=False,
        )
        server = uvicorn.Server(config)
        log.info("model host on http://%s:%d", settings.host_address, settings.host_port)
        server.run()
        engine.stop()
        return 0 if server.started else 1
    finally:
        lock.release()
