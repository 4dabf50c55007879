"""Bearer-token auth for MCP over HTTP, with the shared secret from `train_worker.auth_token`."""

from __future__ import annotations

import hmac

from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings


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
