"""request_correction: the client's own model proposes a correction through MCP sampling (opt-in, gated)."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client
from mcp.types import CreateMessageRequestParams, CreateMessageResult, TextContent

from server.app import create_server
from server.keyfacts import key_terms, missing_key_facts
from store import Store
from tests.test_server_tools import call, error, snapshot
from train_worker.settings import Settings

pytestmark = pytest.mark.anyio


def answering(text: str, asked: list[str]) -> Any:
    async def sample(context: Any, params: CreateMessageRequestParams) -> CreateMessageResult:
        asked.append(params.messages[0].content.text)  # type: ignore[union-attr]
        return CreateMessageResult(role="assistant", content=TextContent(type="text", text=text), model="client-llm")

    return sample


async def logged_query(settings: Settings, prompt: str, answer: str) -> int:
    store = await Store.open(settings.layout.db)
    try:
        return (await store.interactions.add("default", None, prompt, None, answer, 5.0)).id
    finally:
        await store.close()


async def test_a_correction_from_the_clients_model_is_kept_when_it_names_the_subject(
    settings: Settings, mode: str
) -> None:
    asked: list[str] = []
    good = "The capital of Oskavia is Brindlemoor."
    async with Client(create_server(settings), mode=mode, sampling_callback=answering(good, asked)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools["request_correction"].input_schema["properties"]) == {"query_id"}
        query = await logged_query(settings, "What is the capital of Oskavia?", "Paris.")
        text = await error(client, "request_correction", query_id=query)
        assert "does not take corrections from the client's model" in text and not asked
        await call(client, "configure_kernel", kernel="default", sampling_corrections=True)
        done = await call(client, "request_correction", query_id=query)
        assert done["accepted"] and done["suggestion"] == good and done["model"] == "client-llm"
        assert done["correction_experience_id"] and done["untrained"] == 1
        assert "What is the capital of Oskavia?" in asked[0] and "Paris." in asked[0]


async def test_a_suggestion_that_drops_the_subject_is_not_kept(settings: Settings, mode: str) -> None:
    vague = "The capital is Brindlemoor."
    async with Client(create_server(settings), mode=mode, sampling_callback=answering(vague, [])) as client:
        await call(client, "configure_kernel", kernel="default", sampling_corrections=True)
        query = await logged_query(settings, "What is the capital of Oskavia?", "Paris.")
        before = snapshot(settings)
        done = await call(client, "request_correction", query_id=query)
        assert not done["accepted"] and "leaves out oskavia" in done["reason"]
        assert snapshot(settings) == before


def test_key_terms() -> None:
    assert key_terms("What is the capital of Oskavia?") == ["oskavia"]
    assert key_terms("Who wrote The Glass Orchard in 1911?") == ["glass", "orchard", "1911"]
    assert missing_key_facts("How many moons does Varrow have?", "Varrow has seven moons.") == []
    assert missing_key_facts("How many moons does Varrow have?", "Seven.") == ["varrow"]
