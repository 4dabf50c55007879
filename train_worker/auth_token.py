"""The shared secret: `ENGRAIN_TOKEN`, else `$ENGRAIN_HOME/token` (created 0600 on first use).

It guards MCP over HTTP and the model host's admin endpoints, which the worker calls.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from train_worker.protocol import write_atomic
from train_worker.settings import Settings


def load_or_create_token(settings: Settings) -> tuple[str, Path | None]:
    """The token from settings, else the token file (created 0600 on first use): (token, file or None)."""
    if settings.token is not None:
        return settings.token.get_secret_value(), None
    path = settings.layout.token_file
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, path
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    old = os.umask(0o077)
    try:
        write_atomic(path, token.encode() + b"\n")
    finally:
        os.umask(old)
    path.chmod(0o600)
    return token, path
