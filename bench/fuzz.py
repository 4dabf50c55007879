"""Property-based inputs to every MCP tool (hypothesis), shared by tests/test_fuzz.py and bench/faults.py.

Arguments are drawn from each tool's own input schema, biased towards the edges (huge and negative
numbers, empty, overlong and non-UTF-8 text, missing and extra fields), mixed with arbitrary JSON. Every
call must either succeed, or return an error that names the field it is about, leave the store exactly
as it was, and leave the server answering.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client, MCPError

# Names and ids that exist, nearly exist, or attack a path.
WORDS = [
    "default", "fuzz", "", " ", "x\n", "Default", "a" * 63, "a" * 64, "../etc", "..", "/tmp",
    "r-20261123T201500-a1b2c3", "r-20261123T201500-a1b2c3\n", "\ud800", "a\x00b", "é" * 10, "1e999", "NaN",
    "{}", "$ref", "#",
]  # fmt: skip
EDGE_INTS = [0, 1, -1, 2, 5, 200, 2048, 2049, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
EDGE_FLOATS = [0.0, -0.0, 1e-300, 0.5, 1.0, 100.0, 100.0001, 3600.0, 3600.5, 1e20, 1e300, -1e300]
VOLATILE = {"run_events", "quarantine"}  # written by background sweeps, not by a tool call


def junk() -> st.SearchStrategy[Any]:
    leaves = (
        st.none()
        | st.booleans()
        | st.sampled_from(EDGE_INTS)
        | st.integers(-(2**70), 2**70)
        | st.sampled_from(EDGE_FLOATS)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.sampled_from(WORDS)
        | st.text(max_size=40)
    )
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
        max_leaves=8,
    )


def for_schema(schema: dict[str, Any], defs: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
    """Values of roughly the schema's shape, at its edges; arbitrary JSON now and then."""
    if depth > 4:
        return junk()
    if "$ref" in schema:
        target = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
        return for_schema(target, defs, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return st.one_of([for_schema(s, defs, depth + 1) for s in schema[key]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"]) | junk()
    kind = schema.get("type")
    typed: st.SearchStrategy[Any]
    if kind == "string":
        typed = (
            st.sampled_from(WORDS)
            | st.text(max_size=60)
            | st.text(st.characters(codec=None, min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=3)
            | st.just("q" * 20_000)
        )
    elif kind == "integer":
        typed = st.sampled_from(EDGE_INTS) | st.integers(-5, 300)
    elif kind == "number":
        typed = st.sampled_from(EDGE_FLOATS) | st.floats(-1e6, 1e6) | st.sampled_from(EDGE_INTS)
    elif kind == "boolean":
        typed = st.booleans()
    elif kind == "null":
        typed = st.none()
    elif kind == "array":
        typed = st.lists(for_schema(schema.get("items", {}), defs, depth + 1), max_size=3)
    elif kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        typed = st.fixed_dictionaries({}, optional={k: for_schema(v, defs, depth + 1) for k, v in props.items()})
    else:
        return junk()
    return st.one_of(typed, typed, typed, junk())


def arguments(tool_schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    defs = tool_schema.get("$defs", {})
    props = tool_schema.get("properties", {})
    required = set(tool_schema.get("required", []))
    base = st.fixed_dictionaries(
        {k: for_schema(v, defs) for k, v in props.items() if k in required},
        optional={k: for_schema(v, defs) for k, v in props.items() if k not in required},
    )
    # Now and then a required field goes missing, or an unknown one comes along.
    missing = st.fixed_dictionaries({}, optional={k: for_schema(v, defs) for k, v in props.items()})
    extra = st.builds(lambda d, k, v: {**d, k: v}, base, st.sampled_from(["bogus", "settings2", "Kernel"]), junk())
    return st.one_of(base, base, base, missing, extra)


@dataclass
class ToolStats:
    cases: int = 0
    ok: int = 0
    refused: int = 0
    protocol_refused: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass
class FuzzReport:
    tools: dict[str, ToolStats] = field(default_factory=dict)
    crashed: bool = False

    @property
    def cases(self) -> int:
        return sum(t.cases for t in self.tools.values())

    @property
    def failures(self) -> list[str]:
        return [f"{name}: {f}" for name, t in self.tools.items() for f in t.failures]

    def summary(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "per_tool_min": min((t.cases for t in self.tools.values()), default=0),
            "ok": sum(t.ok for t in self.tools.values()),
            "refused_with_named_field": sum(t.refused for t in self.tools.values()),
            "refused_by_protocol": sum(t.protocol_refused for t in self.tools.values()),
            "unclear_or_changed_store": len(self.failures),
            "server_crashes": int(self.crashed),
            "tools": {name: t.__dict__ | {"failures": t.failures[:5]} for name, t in sorted(self.tools.items())},
        }


def snapshot(db: Path) -> dict[str, Any]:
    with sqlite3.connect(db) as raw:
        tables = [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {t: raw.execute(f"SELECT * FROM {t}").fetchall() for t in tables if t not in VOLATILE}


def _names_a_field(text: str, args: dict[str, Any], schema: dict[str, Any]) -> bool:
    names = set(args) | set(schema.get("properties", {}))
    for props in (d.get("properties", {}) for d in schema.get("$defs", {}).values()):
        names |= set(props)
    return any(name in text for name in names)


async def _one(client: Client, db: Path, tool: str, schema: dict[str, Any], args: dict[str, Any], s: ToolStats) -> None:
    if tool == "wait_for_training":
        args = {**args, "timeout_s": 0.2} if isinstance(args.get("timeout_s"), int | float) else args
    before = await anyio.to_thread.run_sync(snapshot, db)
    s.cases += 1
    try:
        result = await client.call_tool(tool, args)
    except MCPError as exc:
        s.protocol_refused += 1
        if not str(exc):
            s.failures.append(f"{args!r:.200}: a protocol error without a message")
        return
    if not result.is_error:
        s.ok += 1
        return
    text = " ".join(getattr(c, "text", "") for c in result.content)
    problems = []
    if not text.strip():
        problems.append("an error without a message")
    elif "internal error" in text:
        problems.append(f"an internal error: {text[:300]}")
    elif not _names_a_field(text, args, schema):
        problems.append(f"an error that names no field: {text[:300]}")
    if await anyio.to_thread.run_sync(snapshot, db) != before:
        problems.append("a refused call changed the store")
    if problems:
        s.failures.append(f"{args!r:.200} -> {'; '.join(problems)}")
    else:
        s.refused += 1


def _checker(client: Client, db: Path, name: str, schema: dict[str, Any], stats: ToolStats, examples: int) -> Any:
    @settings(
        max_examples=examples, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(arguments(schema))
    def check(args: dict[str, Any]) -> None:
        anyio.from_thread.run(_one, client, db, name, schema, args, stats)

    return check


async def fuzz_tools(client: Client, db: Path, examples: int, only: list[str] | None = None) -> FuzzReport:
    """Call every tool with `examples` generated argument sets; never raises for a bad outcome, counts it."""
    report = FuzzReport()
    for tool in (await client.list_tools()).tools:
        if only and tool.name not in only:
            continue
        stats = report.tools.setdefault(tool.name, ToolStats())
        await anyio.to_thread.run_sync(_checker(client, db, tool.name, dict(tool.input_schema), stats, examples))
    try:
        await client.call_tool("list_kernels", {})
    except Exception:
        report.crashed = True
    return report
