"""`engrain demo`: teach the embedded model new facts through a real MCP session, and show before/after.

It starts `engrain serve` over stdio (which starts the model host and the training watcher), records
made-up facts, trains through the real worker, and prints the answers before and after with the gate
report. Everything lives in a demo home (default `./.engrain-demo`); its model and baseline caches are
kept between demos, its kernels and runs are not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from train_worker.locks import host_lock, watcher_lock
from train_worker.settings import Layout

KERNEL = "demo"
KEEP = {"models", "cache"}  # slow to rebuild, never demo-specific
console = Console(stderr=False)


def _facts() -> dict[str, Any]:
    return dict(json.loads(resources.files("server").joinpath("demo_facts.json").read_text()))


async def _call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    if result.is_error:
        text = getattr(result.content[0], "text", "") if result.content else ""
        raise RuntimeError(f"{tool} failed: {text}")
    return dict(result.structured_content or {})


async def _ask_all(client: Client, prompts: list[str]) -> list[tuple[str, str]]:
    """Ask concurrently (the host batches them into one generation); each answer with who gave it."""
    answers = [("", "")] * len(prompts)

    async def ask(i: int) -> None:
        reply = await _call(client, "query_kernel", kernel=KERNEL, prompt=prompts[i], max_new_tokens=48)
        answers[i] = (str(reply["response"]), "base" if reply["version"] is None else f"v{reply['version']}")

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(ask, i)
    return answers


async def _wait_for_host(client: Client, within: float = 900) -> None:
    """The first start dequantises the embedded model once (about a minute); later starts take a second."""
    deadline = time.monotonic() + within
    with console.status("starting the model host (the first start caches the embedded model)..."):
        while True:
            try:
                await _call(client, "query_kernel", kernel=KERNEL, prompt="Hello", max_new_tokens=1)
                return
            except RuntimeError as exc:
                waiting = any(s in str(exc) for s in ("not running", "is starting", "not serving"))
                if not waiting or time.monotonic() > deadline:
                    raise
            await anyio.sleep(1)


async def _train(client: Client) -> dict[str, Any]:
    started = await _call(client, "train_model", kernel=KERNEL)
    run_id = started["run_id"]
    columns = [
        TextColumn("[bold]{task.fields[phase]:<15}"),
        BarColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=1, phase="requested", loss="-", eta="-")
        while True:
            run = (await _call(client, "training_status", run_id=run_id))["run"]
            done = run["status"] in ("deployed", "rejected", "failed", "cancelled")
            training = run.get("phase") == "training" and not done
            step = run.get("step") or 0
            bar.update(
                task,
                completed=step,
                # An early stop ends before the planned steps: a finished run's bar is full, with no ETA left.
                total=(step or 1) if done else run.get("total_steps") or 1,
                phase=run["status"] if done else run.get("phase") or run["status"],
                loss=f"{run['loss']:.3f}" if run.get("loss") is not None else "-",
                eta=f"{run['eta_s']:.0f}s" if training and run.get("eta_s") else "-",
            )
            if done:
                return dict(run)
            await anyio.sleep(1)


def _table(title: str, rows: Sequence[Sequence[str]], headers: tuple[str, ...]) -> Table:
    table = Table(title=title, show_lines=True)
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


async def run_demo(home: Path, keep_running: bool) -> int:
    layout = Layout(home)
    if home.exists():
        for child in home.iterdir():
            if child.name not in KEEP:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    layout.ensure()
    data = _facts()
    facts: list[dict[str, Any]] = data["facts"]
    questions = [f["prompt"] for f in facts] + [f["paraphrases"][0] for f in facts]
    general: list[str] = data["general"]
    env = {k: v for k, v in os.environ.items() if k.startswith(("ENGRAIN_", "OMP_"))}
    env |= {"ENGRAIN_HOME": str(layout.home), "ENGRAIN_EMBEDDED_SERVICES": "true", "HF_HUB_OFFLINE": "1"}
    params = StdioServerParameters(command=sys.executable, args=["-m", "server.cli", "serve"], env=env)
    console.rule("[bold]engrain demo")
    console.print(f"home: {layout.home}  (server, host and trainer logs in {layout.logs})")
    try:
        with (layout.logs / "demo-serve.log").open("w") as errlog:
            async with Client(stdio_client(params, errlog=errlog)) as client:
                await _call(client, "create_kernel", name=KERNEL, description="engrain demo")
                await _wait_for_host(client)
                with console.status("asking the base model..."):
                    before = await _ask_all(client, questions + general)
                recorded = await _call(client, "record_experiences", kernel=KERNEL, items=facts)
                console.print(f"recorded {recorded['created']} new facts for kernel '{KERNEL}'; training...")
                run = await _train(client)
                after = await _ask_all(client, questions + general) if run["status"] == "deployed" else before
        _report(facts, questions, general, before, after, run)
        return 0 if run["status"] == "deployed" else 1
    finally:
        if not keep_running:
            _stop_services(layout)


def _report(
    facts: list[dict[str, Any]],
    questions: list[str],
    general: list[str],
    before: list[tuple[str, str]],
    after: list[tuple[str, str]],
    run: dict[str, Any],
) -> None:
    keys = [f["key_answer"] for f in facts] * 2
    rows = []
    for q, key, (b, _), (a, by) in zip(questions, keys, before, after, strict=False):
        mark = "[green]yes" if key.lower() in a.lower() else "[red]no"
        rows.append((q, key, _short(b), _short(a), by, mark))
    console.print(
        _table("New facts: questions and paraphrases", rows, ("question", "key", "before", "after", "by", "learnt"))
    )
    n = len(general)
    general_rows = [
        (q, _short(b), _short(a), by) for q, (b, _), (a, by) in zip(general, before[-n:], after[-n:], strict=True)
    ]
    console.print(_table("General questions: kept?", general_rows, ("question", "before", "after", "by")))
    console.print(
        "by: who answered after training. The new version answers what names something it was taught; the base "
        "answers the rest (serve_scope)."
    )
    gate_rows = [
        (
            g["name"],
            "-" if g["value"] is None else f"{g['value']:.3f}",
            f"{g['comparison']} {g['threshold']}" if g["threshold"] is not None else "-",
            {"passed": "[green]passed", "failed": "[red]failed"}.get(g["status"], g["status"]),
        )
        for g in run["gates"]
    ]
    console.print(_table("Quality gates", gate_rows, ("gate", "value", "threshold", "status")))
    learnt = sum(1 for r in rows if "yes" in r[-1])
    verdict = f"run {run['run_id']}: {run['status']}"
    if run["status"] == "deployed":
        verdict += f", version v{run['new_version']}; {learnt}/{len(rows)} questions answered with the new fact"
    else:
        verdict += f": {run.get('error')}"
    console.rule(verdict)


def _short(text: str, limit: int = 90) -> str:
    """First sentence, at most `limit` characters: enough to see whether the fact is there."""
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _stop_services(layout: Layout) -> None:
    for lock in (watcher_lock(layout.locks), host_lock(layout.locks)):
        pid = lock.holder()
        if pid and lock.held_elsewhere():
            os.kill(pid, signal.SIGTERM)


def main(home: Path, keep_running: bool) -> int:
    return anyio.run(run_demo, home.resolve(), keep_running)
