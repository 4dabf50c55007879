"""The worker's side of the training lease (`locks/training.lease`, a `TrainingLease`).

A worker that needs the model host's memory writes the lease (atomically) before it loads a model,
refreshes its heartbeat from a thread, and removes it on every way out: success, failure, cancel,
SIGTERM. The host owns the rest: it unloads while a live lease exists and reloads itself once the lease
is gone, stale, or held by a dead process (a SIGKILLed worker). So no crash, timeout or busy host can
make a run fail or leave the host down. The worker may wait a bounded time for the host to report
itself unloaded before it loads its own model; if the host does not, it goes on with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

from train_worker.protocol import HostEndpoint, ProtocolError, TrainingLease, quarantine, read_model, write_model
from train_worker.settings import Layout

log = logging.getLogger(__name__)

TTL_S = 30.0  # stale after this long without a heartbeat (a hung worker, or a reused pid)
BEAT_S = 5.0


class Lease:
    """Held from `acquire()` to `release()`; the heartbeat thread keeps it fresh in between."""

    def __init__(self, layout: Layout, run_id: str | None, ttl_s: float = TTL_S, beat_s: float = BEAT_S) -> None:
        self.path = layout.lease
        self._quarantine = layout.quarantine
        self.run_id = run_id
        self.ttl_s = ttl_s
        self.beat_s = beat_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquired_at: datetime | None = None

    def acquire(self) -> None:
        try:
            read_model(self.path, TrainingLease)
        except ProtocolError as exc:
            if self.path.exists():  # a damaged lease (only a worker writes one, and only one works at a time)
                moved = quarantine(self.path, self._quarantine, str(exc))
                log.warning("quarantined a damaged training lease as %s: %s", moved.name, exc)
        self._acquired_at = datetime.now(UTC)
        self._write()
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="engrain-lease", daemon=True)
        self._thread.start()
        log.info("training lease taken: the model host unloads while it is held")

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, unless another process has replaced it since."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.beat_s + 1)
            self._thread = None
        held = read_lease(self.path)
        if held is None or held.holder_pid == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._acquired_at = None
        log.info("training lease released: the model host reloads by itself")

    @property
    def held(self) -> bool:
        return self._acquired_at is not None

    def _write(self) -> None:
        assert self._acquired_at is not None
        now = datetime.now(UTC)
        write_model(
            self.path,
            TrainingLease(
                holder_pid=os.getpid(),
                run_id=self.run_id,
                acquired_at=self._acquired_at,
                heartbeat_at=now,
                ttl_s=self.ttl_s,
            ),
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._write()
            except OSError as exc:  # a full disk must not kill the run; a stale lease only reloads the host
                log.warning("could not refresh the training lease: %s", exc)


def read_lease(path: Path) -> TrainingLease | None:
    """The lease if present and valid; a torn or foreign file counts as no lease."""
    try:
        return read_model(path, TrainingLease)
    except ProtocolError:
        return None


def clear_dead_lease(layout: Layout) -> bool:
    """Remove a lease whose holder is gone (after a killed worker); True when one was removed."""
    lease = read_lease(layout.lease)
    if layout.lease.exists() and (lease is None or not lease.live()):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.lease)
        return True
    return False


def host_endpoint(layout: Layout) -> HostEndpoint | None:
    """Where this home's host listens (`host.json`), or None when no host has said so."""
    try:
        return read_model(layout.host_endpoint, HostEndpoint)
    except ProtocolError:
        return None


def host_status(layout: Layout, token: str, timeout: float = 2.0) -> str | None:
    """This home's host's `/health` status, or None when none answers (or one that is not ours does)."""
    endpoint = host_endpoint(layout)
    if endpoint is None:
        return None
    try:
        response = httpx.get(
            f"{endpoint.url.rstrip('/')}/health", headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(body, dict):
        return None
    if body.get("home_id", endpoint.home_id) != endpoint.home_id:
        log.warning("the host at %s belongs to another home; not waiting for it", endpoint.url)
        return None
    status = body.get("status")
    return status if isinstance(status, str) else None


UNLOADED = frozenset({None, "unloaded", "failed"})  # None: no host answers, so none holds memory
SERVING = frozenset({None, "ok", "failed"})  # "failed": it will not come back by waiting


def wait_for_host(
    status: Callable[[], str | None],
    until: frozenset[str | None],
    timeout_s: float,
    stop: Callable[[], None] = lambda: None,
    every: float = 0.25,
) -> bool:
    """Poll `status` until it is one of `until` (True), or `timeout_s` passes (False).

    `stop` is called between polls and raises when the run must stop.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if status() in until:
            return True
        if time.monotonic() >= deadline:
            return False
        stop()
        time.sleep(every)
