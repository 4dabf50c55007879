"""record_experiences throughput through the MCP in-memory client, as a ratio to raw sqlite3 inserts.

Both sides write the same rows into the same schema (engrain's migrations) with the same pragmas
(WAL, synchronous=NORMAL), one transaction per batch, measured in one run. Also reports the latency
distribution of single record_experience calls.

    .venv/bin/python -m bench.record [--batches 40] [--batch-size 100] [--singles 500] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

from server.app import create_server
from store.experiences import content_hash
from store.migrations import MIGRATIONS
from train_worker.settings import Settings

RESULTS = Path(__file__).with_name("results") / "record.json"


def _rows(start: int, n: int) -> list[dict[str, str]]:
    return [
        {
            "prompt": f"What is the code name of project {i}?",
            "response": f"Project {i} is code-named Falcon-{i * 7919 % 10007}.",
            "key_answer": f"Falcon-{i * 7919 % 10007}",
        }
        for i in range(start, start + n)
    ]


def raw_sqlite(db_path: Path, batches: list[list[dict[str, str]]]) -> float:
    """The floor: executemany into the same table, one transaction per batch."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    for migration in MIGRATIONS:
        for statement in migration.statements():
            conn.execute(statement)
    now = "2026-11-23T00:00:00.000000+00:00"
    conn.execute(
        "INSERT INTO kernels (name, base_model, config, created_at, updated_at) VALUES ('b', 'x', '{}', ?, ?)",
        (now, now),
    )
    started = time.perf_counter()
    for batch in batches:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO experiences (kernel, prompt, response, key_answer, source, content_hash, created_at,"
            " updated_at) VALUES ('b', ?, ?, ?, 'agent', ?, ?, ?)",
            [(r["prompt"], r["response"], r["key_answer"], content_hash(r["prompt"], r["response"], None), now, now)
             for r in batch],
        )  # fmt: skip
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed


async def through_mcp(home: Path, batches: list[list[dict[str, str]]], singles: list[dict[str, str]]) -> dict[str, Any]:
    settings = Settings(home=home, embedded_services=False, host_port=9)
    async with Client(create_server(settings)) as client:
        # Warm-up: first calls pay for schema caches and imports.
        await client.call_tool("record_experiences", {"kernel": "default", "items": _rows(10**7, 5)})
        started = time.perf_counter()
        for batch in batches:
            r = await client.call_tool("record_experiences", {"kernel": "default", "items": batch})
            assert not r.is_error, r.content
        batch_time = time.perf_counter() - started
        latencies = []
        for row in singles:
            t0 = time.perf_counter()
            r = await client.call_tool("record_experience", {"kernel": "default", **row})
            latencies.append((time.perf_counter() - t0) * 1000)
            assert not r.is_error, r.content
    latencies.sort()
    single_ms = (
        {
            "p50": statistics.median(latencies),
            "p99": latencies[max(0, int(len(latencies) * 0.99) - 1)],
            "max": latencies[-1],
        }
        if latencies
        else None
    )
    return {"batch_seconds": batch_time, "single_ms": single_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--singles", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5, help="alternating raw / MCP measurements")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    batches = [_rows(b * args.batch_size, args.batch_size) for b in range(args.batches)]
    singles = _rows(10**6, args.singles)
    rows = args.batches * args.batch_size
    # Alternate the two sides on fresh databases and take medians: one pass of either is a few hundred
    # milliseconds, so a single pair moves with whatever else the machine does.
    raws: list[float] = []
    mcps: list[float] = []
    single_ms: dict[str, float] = {}
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            raws.append(raw_sqlite(Path(tmp) / "raw.db", batches))
            ours = anyio.run(through_mcp, Path(tmp) / "home", batches, singles if repeat == 0 else [])
            mcps.append(ours["batch_seconds"])
            single_ms = single_ms or ours["single_ms"]
    raw, mcp = statistics.median(raws), statistics.median(mcps)
    ratio = statistics.median(r / m for r, m in zip(raws, mcps, strict=True))
    report = {
        "rows": rows,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "raw_sqlite_rows_per_s": rows / raw,
        "mcp_rows_per_s": rows / mcp,
        "ratio_to_raw_sqlite": ratio,
        "ratios": [r / m for r, m in zip(raws, mcps, strict=True)],
        "single_record_experience_ms": single_ms,
        "goal": {"ratio_to_raw_sqlite": ">= 0.25", "single_p99_ms": "< 10"},
    }
    print(f"record_experiences, batches of {args.batch_size}: {rows / mcp:,.0f} rows/s via MCP")
    print(f"raw sqlite3 executemany, same rows and schema: {rows / raw:,.0f} rows/s")
    print(f"ratio to raw sqlite3: {ratio:.2f}, median of {args.repeats} alternating pairs (goal >= 0.25)")
    s = single_ms
    print(
        f"single record_experience: p50 {s['p50']:.2f} ms, p99 {s['p99']:.2f} ms, max {s['max']:.2f} ms (goal p99 < 10)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
