"""Push `resources/updated` to clients in both protocol eras."""

from __future__ import annotations

import logging
from typing import Any

import mcp.types as types
from mcp.server.mcpserver import MCPServer
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated

log = logging.getLogger(__name__)


class Notifier:
    """Modern clients listen on the bus; legacy sessions subscribed with `resources/subscribe`."""

    def __init__(self, bus: InMemorySubscriptionBus) -> None:
        self.bus = bus
        self._legacy: dict[str, list[Any]] = {}

    def subscribe(self, uri: str, session: Any) -> None:
        sessions = self._legacy.setdefault(uri, [])
        if session not in sessions:
            sessions.append(session)

    def unsubscribe(self, uri: str, session: Any) -> None:
        if session in self._legacy.get(uri, []):
            self._legacy[uri].remove(session)

    async def updated(self, *uris: str) -> None:
        for uri in uris:
            await self.bus.publish(ResourceUpdated(uri=uri))
            for session in list(self._legacy.get(uri, [])):
                try:
                    await session.send_resource_updated(uri)
                except Exception:  # a closed session: forget it
                    log.debug("dropping closed session subscribed to %s", uri)
                    self.unsubscribe(uri, session)


def install_legacy_subscriptions(mcp: MCPServer[Any]) -> None:
    """Serve `resources/subscribe` for 2025-era sessions (the SDK has no public hook for it)."""

    async def on_subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        ctx.lifespan_context.notifier.subscribe(str(params.uri), ctx.session)
        return types.EmptyResult()

    async def on_unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        ctx.lifespan_context.notifier.unsubscribe(str(params.uri), ctx.session)
        return types.EmptyResult()

    mcp._lowlevel_server.add_request_handler("resources/subscribe", types.SubscribeRequestParams, on_subscribe)
    mcp._lowlevel_server.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, on_unsubscribe)
