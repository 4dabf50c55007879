"""The HTTP processes: `engrain serve --http` (MCP at /mcp and the dashboard at /dashboard) and
`engrain dashboard` (the dashboard alone, beside a stdio server), both behind the bearer token."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route

from server.app import create_server, open_state
from server.dashboard.app import Dashboard
from server.http_auth import StaticTokenVerifier, auth_settings
from server.state import StateRef
from train_worker.auth_token import load_or_create_token
from train_worker.settings import Settings

log = logging.getLogger("engrain")

DASHBOARD_PATH = "/dashboard"
DASHBOARD_PORT = 8766  # `engrain dashboard`; `serve --http` shows it on its own port
SHUTDOWN_GRACE_S = 3  # live run streams never end on their own while a run trains


async def _to_dashboard(request: Request) -> Response:
    return RedirectResponse(f"{DASHBOARD_PATH}/", status_code=307)


LOOPBACK_HOSTS = ("127.0.0.1:*", "localhost:*", "[::1]:*")  # the SDK's own defaults for a loopback bind


def _token(settings: Settings) -> str:
    token, path = load_or_create_token(settings)
    log.warning("bearer token %s", f"in {path}" if path else "from ENGRAIN_TOKEN")
    return token


def mcp_and_dashboard(settings: Settings, address: str, port: int, allowed_hosts: tuple[str, ...]) -> Starlette:
    token = _token(settings)
    base_url = f"http://{address}:{port}"
    ref = StateRef()
    mcp = create_server(settings, token_verifier=StaticTokenVerifier(token), auth=auth_settings(base_url), ref=ref)
    security = None
    if allowed_hosts:
        # Added to the loopback names the SDK accepts by default, never in their place.
        hosts = [*LOOPBACK_HOSTS, *allowed_hosts]
        origins = [f"http://{h}" for h in hosts]
        security = TransportSecuritySettings(allowed_hosts=hosts, allowed_origins=origins)
    app = mcp.streamable_http_app(transport_security=security, host=address)
    app.router.routes += [
        Mount(DASHBOARD_PATH, Dashboard(ref, token, allowed_hosts).app()),
        Route("/", _to_dashboard),
    ]
    log.warning("MCP over HTTP at %s/mcp; dashboard at %s%s/", base_url, base_url, DASHBOARD_PATH)
    return app


def dashboard_only(settings: Settings, address: str, port: int, allowed_hosts: tuple[str, ...]) -> Starlette:
    """The dashboard over the store, with the result pickup but without the host, watcher or auto-training
    loop: `engrain serve` runs those."""
    token = _token(settings)
    ref = StateRef()

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with open_state(settings, InMemorySubscriptionBus(), services=False, autotrain=False) as state:
            ref.set(state)
            try:
                yield
            finally:
                ref.set(None)

    log.warning("dashboard at http://%s:%d%s/", address, port, DASHBOARD_PATH)
    return Starlette(
        routes=[Mount(DASHBOARD_PATH, Dashboard(ref, token, allowed_hosts).app()), Route("/", _to_dashboard)],
        lifespan=lifespan,
    )


def serve(app: Starlette, address: str, port: int, log_level: str) -> int:
    config = uvicorn.Config(
        app, host=address, port=port, log_level=log_level.lower(), timeout_graceful_shutdown=SHUTDOWN_GRACE_S
    )
    uvicorn.Server(config).run()
    return 0
