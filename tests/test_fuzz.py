"""Property-based inputs to every tool (bench/fuzz.py): clear errors naming the field, no store change on
refusal, no crash. CI draws a few dozen cases per tool; bench/faults.py draws a thousand."""

from __future__ import annotations

import pytest
from mcp import Client

from bench.fuzz import fuzz_tools
from server.app import create_server
from train_worker.settings import Settings

pytestmark = pytest.mark.anyio

EXAMPLES_PER_TOOL = 40


async def test_every_tool_refuses_bad_input_clearly_and_changes_nothing(settings: Settings) -> None:
    async with Client(create_server(settings)) as client:
        await client.call_tool("create_kernel", {"name": "fuzz"})
        await client.call_tool("record_experience", {"kernel": "fuzz", "prompt": "Q?", "response": "A."})
        report = await fuzz_tools(client, settings.layout.db, EXAMPLES_PER_TOOL)
    assert not report.crashed
    assert len(report.tools) >= 15 and all(t.cases >= EXAMPLES_PER_TOOL for t in report.tools.values())
    assert report.failures == [], "\n".join(report.failures[:20])
    assert sum(t.refused for t in report.tools.values()) > 0
