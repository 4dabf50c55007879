"""How the MCP server reaches the model host."""

from __future__ import annotations

import httpx
from pydantic import ValidationError

from host.api import ChatMessage, ChatRequest, ChatResponse, Health


class HostUnavailable(Exception):
    pass


class HostError(Exception):
    pass


class HostClient:
    def __init__(self, base_url: str, *, timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = timeout

    def _not_running(self, exc: Exception) -> HostUnavailable:
        return HostUnavailable(
            f"the model host is not reachable at {self.base_url} ({type(exc).__name__}). Start it with "
            "`engrain host` (or `engrain up` for host and trainer together); under systemd, "
            "`systemctl --user start engrain-host`. If a training run is in progress, the host is stopped "
            "to free memory and comes back when the run ends: check training_status."
        )

    async def health(self) -> Health | None:
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                response = await client.get(f"{self.base_url}/health")
            return Health.model_validate_json(response.content) if response.status_code == 200 else None
        except (httpx.HTTPError, ValidationError):
            return None

    async def chat(self, kernel: str, prompt: str, system: str | None, max_new_tokens: int) -> ChatResponse:
        messages = [ChatMessage(role="system", content=system)] if system else []
        messages.append(ChatMessage(role="user", content=prompt))
        body = ChatRequest(model=kernel, messages=messages, max_tokens=max_new_tokens, temperature=0.0)
        try:
            async with httpx.AsyncClient(timeout=self._timeout) as client:
                response = await client.post(
                    f"{self.base_url}/v1/chat/completions", content=body.model_dump_json(exclude_none=True)
                )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise self._not_running(exc) from exc
        except httpx.HTTPError as exc:
            raise HostError(f"the model host at {self.base_url} failed to answer: {exc}") from exc
        if response.status_code != 200:
            try:
                detail = response.json().get("error", {}).get("message", response.text)
            except ValueError:
                detail = response.text
            if response.status_code == 503:
                raise HostUnavailable(f"the model host is not serving right now: {detail}")
            raise HostError(f"the model host refused the query ({response.status_code}): {detail}")
        try:
            return ChatResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise HostError(f"the model host sent an answer that is not a chat completion: {exc}") from exc
