"""`engrain host`: the model host process, in the foreground until SIGTERM/SIGINT.

It binds its port before loading anything (a taken `ENGRAIN_HOST_PORT` fails at once, with the reason),
writes `host.json` once it listens, and removes it when it stops.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket

import uvicorn

from host.app import create_app
from host.endpoint import remove_endpoint, write_endpoint
from host.engine import Engine
from host.kernel_watch import KernelWatcher
from host.lease_watch import LeaseWatcher
from host.transformers_backend import TransformersBackend
from train_worker.auth_token import load_or_create_token
from train_worker.locks import host_lock
from train_worker.settings import Settings

log = logging.getLogger(__name__)


class PortTaken(Exception):
    pass


def bind(address: str, port: int) -> socket.socket:
    """A listening socket on `address:port` (port 0: a free one), or `PortTaken` saying what to do."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortTaken(
                f"port {port} on {address} is taken (ENGRAIN_HOST_PORT={port}), perhaps by another ENGRAIN_HOME's "
                "host; set another port, or unset ENGRAIN_HOST_PORT so the host picks a free one and records it "
                "in $ENGRAIN_HOME/host.json"
            ) from exc
        raise
    sock.listen(128)
    return sock


def serve(settings: Settings) -> int:
    """Run the host until SIGTERM/SIGINT; 0 on a clean stop, 1 when it could not start."""
    layout = settings.layout
    layout.ensure()
    lock = host_lock(layout.locks)
    if not lock.acquire():
        log.warning("a model host (pid %s) is already running for %s; this one exits", lock.holder(), layout.home)
        return 0
    try:
        try:
            sock = bind(settings.host_address, settings.host_port)
        except PortTaken as exc:
            log.error("%s", exc)
            return 1
        address, port = sock.getsockname()[:2]
        url = f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"
        token, _ = load_or_create_token(settings)
        engine = Engine(settings, TransformersBackend(settings))
        lease_watcher = LeaseWatcher(engine)
        engine.start(load=not lease_watcher.prime())
        KernelWatcher(engine).start()
        lease_watcher.start()
        config = uvicorn.Config(create_app(engine, token), log_level="warning", access_log=False)
        server = uvicorn.Server(config)
        write_endpoint(layout, url, engine.base_name)
        log.info("model host on %s for %s (recorded in host.json)", url, layout.home)
        # uvicorn re-raises the stop signal once it has shut down; a no-op handler lets the cleanup below run.
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run(sockets=[sock])
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            remove_endpoint(layout)
            engine.stop()
            sock.close()
        return 0 if server.started else 1
    finally:
        lock.release()
