"""Where a home's host listens (`host.json`) and the identity that tells two homes' hosts apart. Torch-free."""

from __future__ import annotations

import contextlib
import hashlib
import os
from datetime import UTC, datetime

from train_worker.protocol import HostEndpoint, ProtocolError, read_model, write_model
from train_worker.settings import Layout


def home_id(layout: Layout) -> str:
    """A stable identity of this home: its resolved path and its directory's inode.

    Two homes never share it, a home recreated at the same path gets a new one, and every process that
    opens the home computes it alike, so the client need not trust `host.json` for it.
    """
    stat = layout.home.stat()
    digest = hashlib.sha256(f"{layout.home}\0{stat.st_dev}\0{stat.st_ino}".encode()).hexdigest()
    return digest[:24]


def write_endpoint(layout: Layout, url: str, base_model: str) -> HostEndpoint:
    endpoint = HostEndpoint(
        home_id=home_id(layout), pid=os.getpid(), url=url, base_model=base_model, started_at=datetime.now(UTC)
    )
    write_model(layout.host_endpoint, endpoint)
    return endpoint


def read_endpoint(layout: Layout) -> HostEndpoint | None:
    """This home's `host.json`, or None when there is none. A malformed file raises `ProtocolError`."""
    if not layout.host_endpoint.exists():
        return None
    return read_model(layout.host_endpoint, HostEndpoint)


def remove_endpoint(layout: Layout) -> None:
    """Remove `host.json` if this process wrote it (a newer host may have replaced it)."""
    with contextlib.suppress(ProtocolError, FileNotFoundError):
        endpoint = read_endpoint(layout)
        if endpoint is not None and endpoint.pid == os.getpid():
            layout.host_endpoint.unlink()
