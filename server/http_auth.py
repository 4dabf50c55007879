"""Bearer-token auth for MCP over HTTP: one shared secret from ENGRAIN_TOKEN or a 0600 token file."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

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


class StaticTokenVerifier:
    """Accepts exactly one token, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode(), self._token.encode()):
            return AccessToken(token=token, client_id="engrain-operator", scopes=["engrain"])
        return None


def auth_settings(base_url: str) -> AuthSettings:
    return AuthSettings(issuer_url=base_url, resource_server_url=f"{base_url}/mcp", required_scopes=["engrain"])
