"""How the MCP server (and anything else in this home) reaches the home's model host. Torch-free.

The host is found through `$ENGRAIN_HOME/host.json`, and before the first query to a host process its
`/health` must name this home: another home's host on a reused port is refused with a clear error.
"""

from __future__ import annotations

import httpx
from pydantic import ValidationError

from host.api import ChatMessage, ChatRequest, ChatResponse, ErrorBody, Health
from host.endpoint import home_id, read_endpoint
from train_worker.protocol import HostEndpoint, ProtocolError, pid_alive
from train_worker.settings import Layout


class HostUnavailable(Exception):
    """The host cannot answer now (not running, starting, or unloaded for training)."""

    def __init__(self, message: str, *, not_running: bool = False) -> None:
        super().__init__(message)
        self.not_running = not_running


class HostError(Exception):
    """The host answered, but not with a completion: a refusal, or a host that is not this home's."""


class HostClient:
    def __init__(self, layout: Layout, token: str, *, timeout: float = 600.0) -> None:
        self.layout = layout
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = timeout
        self._verified: tuple[str, int] | None = None  # (url, pid) of the host last seen to be this home's

    def _not_running(self, why: str) -> HostUnavailable:
        return HostUnavailable(
            f"the model host is not running ({why}). Start it with `engrain host` (or `engrain up` for host and "
            "trainer together); under systemd, `systemctl --user start engrain-host`.",
            not_running=True,
        )

    def _endpoint(self) -> HostEndpoint:
        try:
            endpoint = read_endpoint(self.layout)
        except ProtocolError as exc:
            raise self._not_running(f"{self.layout.host_endpoint} is unreadable: {exc}") from exc
        if endpoint is None:
            raise self._not_running(f"no {self.layout.host_endpoint.name} in {self.layout.home}")
        if not pid_alive(endpoint.pid):
            raise self._not_running(f"{self.layout.host_endpoint.name} is left from pid {endpoint.pid}, which is gone")
        return endpoint

    async def _get_health(self, client: httpx.AsyncClient, url: str) -> Health:
        response = await client.get(f"{url}/health", headers=self._headers)
        if response.status_code == 401:
            raise HostError(
                f"the model host at {url} refused this home's token: it is another ENGRAIN_HOME's host, or "
                f"ENGRAIN_TOKEN differs from the one it started with. Restart this home's host ({self.layout.home})."
            )
        if response.status_code != 200:
            raise HostError(f"the model host at {url} answered /health with {response.status_code}")
        try:
            return Health.model_validate_json(response.content)
        except ValidationError as exc:
            raise HostError(f"{url} is not an engrain model host (its /health is not one): {exc}") from exc

    async def _checked(self, client: httpx.AsyncClient) -> tuple[str, Health | None]:
        """This home's host URL, verified to serve this home; the health answer when it was fetched."""
        endpoint = self._endpoint()
        if self._verified == (endpoint.url, endpoint.pid):
            return endpoint.url, None
        health = await self._get_health(client, endpoint.url)
        expected = home_id(self.layout)
        if health.home_id != expected:
            raise HostError(
                f"the model host at {endpoint.url} serves another ENGRAIN_HOME (home id {health.home_id}, this home "
                f"is {expected}): {self.layout.host_endpoint} is stale or two homes share a port. Restart this "
                f"home's host, and give each home its own ENGRAIN_HOST_PORT (or leave it unset: 0 picks a free one)."
            )
        self._verified = (endpoint.url, endpoint.pid)
        return endpoint.url, health

    async def health(self) -> Health | None:
        """This home's host's health, or None when it is not running or not reachable."""
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                url, health = await self._checked(client)
                return health or await self._get_health(client, url)
        except (HostUnavailable, HostError, httpx.HTTPError):
            return None

    async def chat(
        self,
        kernel: str,
        prompt: str,
        system: str | None,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> ChatResponse:
        messages = [ChatMessage(role="system", content=system)] if system is not None else []
        messages.append(ChatMessage(role="user", content=prompt))
        body = ChatRequest(
            model=kernel,
            messages=messages,
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop or None,
        )
        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                url, _ = await self._checked(client)
                response = await client.post(
                    f"{url}/v1/chat/completions",
                    content=body.model_dump_json(exclude_none=True),
                    headers={**self._headers, "Content-Type": "application/json"},
                )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._not_running(f"nothing answers at its address: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise HostError(f"the model host failed to answer: {exc}") from exc
        if response.status_code != 200:
            detail = _error_message(response)
            if response.status_code == 503:
                raise HostUnavailable(f"the model host is not serving right now: {detail}")
            raise HostError(f"the model host refused the query ({response.status_code}): {detail}")
        try:
            return ChatResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise HostError(f"the model host sent an answer that is not a chat completion: {exc}") from exc


def _error_message(response: httpx.Response) -> str:
    try:
        return ErrorBody.model_validate_json(response.content).error.message
    except ValidationError:
        return response.text[:500]
