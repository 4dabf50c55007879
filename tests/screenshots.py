"""The dashboard screenshots in docs/img/, taken from real runs on the embedded SmolLM2-135M model.

    .venv/bin/python -m tests.screenshots --out docs/img [--caches .engrain-demo]

It starts a model host, a watcher and `engrain serve --http` over a fresh home, teaches a kernel two rounds of
made-up facts (the `engrain demo` facts, four per round) through MCP, and photographs the pages with headless
Chromium: the run page while round 2 trains, then the kernels and versions pages. About 10 minutes on 2 cores;
`--caches` reuses a home's dequantised model and baseline (a `make demo` home has them) to save the first two.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
import httpx
from mcp import Client

from server.app import create_server
from tests.browser import chromium
from tests.procs import free_port, processes, wait_for
from tests.test_server_tools import call
from train_worker.settings import Settings

KERNEL = "atlas"


def _facts() -> list[dict[str, Any]]:
    data = json.loads(resources.files("server").joinpath("demo_facts.json").read_text())
    return list(data["facts"])


async def _teach(settings: Settings, facts: list[dict[str, Any]], create: bool) -> str:
    async with Client(create_server(settings)) as client:
        if create:
            await call(client, "create_kernel", name=KERNEL, description="made-up places, people and things")
        await call(client, "record_experiences", kernel=KERNEL, items=facts)
        return str((await call(client, "train_model", kernel=KERNEL))["run_id"])


async def _run(settings: Settings, run_id: str) -> dict[str, Any]:
    async with Client(create_server(settings)) as client:
        return dict((await call(client, "training_status", run_id=run_id))["run"])


async def _use(settings: Settings) -> None:
    """A few answers, one rated badly, so the review queue and provenance have something to show."""
    async with Client(create_server(settings)) as client:
        answer = await call(client, "query_kernel", kernel=KERNEL, prompt="Who founded the city of Brindlemoor?")
        await call(client, "feedback", query_id=answer["query_id"], rating=1)
        answer = await call(client, "query_kernel", kernel=KERNEL, prompt="What is the capital of Oskavia?")
        await call(client, "feedback", query_id=answer["query_id"], rating=5)


def _wait_run(settings: Settings, run_id: str, until: Any, within: float, what: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run = anyio.run(_run, settings, run_id)
        return run if until(run) else None

    return dict(wait_for(check, within, 2.0, what))


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 401
    except httpx.HTTPError:
        return False


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="Take the dashboard screenshots for docs/img/.")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--caches", type=Path, help="a home whose models/ and cache/ to reuse")
    parser.add_argument("--keep", action="store_true", help="keep the home and leave nothing running")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="engrain-shots-"))
    home = root / "home"
    home.mkdir()
    if args.caches:
        for name in ("models", "cache"):
            if (args.caches / name).is_dir():
                shutil.copytree(args.caches / name, home / name)
    port = free_port()
    env = {
        "ENGRAIN_HOME": str(home),
        "ENGRAIN_HOST_PORT": str(free_port()),
        "ENGRAIN_EMBEDDED_SERVICES": "false",
        "HF_HUB_OFFLINE": "1",
    }
    os.environ.update(env)
    settings = Settings()
    args.out.mkdir(parents=True, exist_ok=True)
    facts = _facts()
    started = time.monotonic()
    with processes(root / "logs", env) as procs:
        procs.start("host")
        procs.start("watch")
        procs.start("serve", "--http", "--port", str(port))
        url = f"http://127.0.0.1:{port}/dashboard"
        wait_for(lambda: _answers(f"{url}/"), 60, 0.5, "the dashboard")
        first = anyio.run(_teach, settings, facts[:4], True)
        print(f"round 1: {first}", file=sys.stderr)
        _wait_run(settings, first, lambda r: r["status"] not in ("queued", "requested", "running", "evaluating"), 1800,
                  "round 1")  # fmt: skip
        second = anyio.run(_teach, settings, facts[4:], False)
        print(f"round 2: {second}", file=sys.stderr)
        token = (home / "token").read_text().strip()
        with chromium(log=root / "chromium.log") as b:
            b.goto(f"{url}/")
            b.submit("#login", token=token)
            _wait_run(settings, second, lambda r: (r["progress"] or 0) >= 0.35, 1800, "round 2 a third through")
            b.goto(f"{url}/runs/{second}")
            b.wait_for("Number(document.querySelector('#live').dataset.updates || 0) >= 2", timeout=60)
            b.screenshot(args.out / "dashboard-run.png", full_page=False)
            _wait_run(settings, second, lambda r: r["status"] not in ("running", "evaluating"), 1800, "round 2")
            anyio.run(_use, settings)
            b.goto(f"{url}/")
            b.screenshot(args.out / "dashboard-kernels.png", full_page=False)
            b.goto(f"{url}/kernels/{KERNEL}")
            b.eval("document.querySelectorAll('#v2 details.list').forEach(d => d.open = true)")
            b.screenshot(args.out / "dashboard-versions.png")
    print(f"screenshots in {args.out} after {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.keep:
        print(f"home kept in {home}", file=sys.stderr)
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
