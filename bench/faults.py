"""The fault suite's figures: real processes on the tiny model, faults injected at named points.

    .venv/bin/python -m bench.faults                  # everything -> bench/results/faults.json
    .venv/bin/python -m bench.faults --rows kill sigterm --trials 2
    .venv/bin/python -m bench.faults --rows fuzz record --merge   # re-measure two rows, keep the others

Rows (docs/reliability.md has the table and the figures):
- kill:     SIGKILL of the worker in each phase; a watcher restarts it, as systemd would.
- sigterm:  SIGTERM in each phase: how long until the worker has exited; the run resumes and ends.
- torn:     a crash exactly between two writes (claim, marker, result, inbox copy, current switch).
- corrupt:  a torn or invalid copy of every file kind a process reads from another.
- race:     100 concurrent train_model calls over two `engrain serve --http` processes on one home.
- homes:    two homes on one machine, each with its host and watcher, training at once.
- enospc:   a full disk while deploying.
- fuzz:     property-based inputs to every tool (bench/fuzz.py).
- record:   8 concurrent MCP-over-HTTP clients x 1000 records.

A phase is reached by pausing the worker there (`ENGRAIN_FAULT=pause:<phase>`, train_worker/faults.py),
then the fault is applied from outside, by pid. Timings are wall-clock on whatever machine runs this.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
from mcp import Client

from server.app import create_server
from tests.procs import free_port, wait_for
from tests.test_worker import LENIENT as WORKER_LENIENT
from tests.test_worker import TINY
from train_worker.auth_token import load_or_create_token
from train_worker.protocol import write_atomic
from train_worker.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "faults.json"
ENGRAIN = str(Path(sys.executable).with_name("engrain"))
PHASES = ["claimed", "stopping_host", "loading", "baseline", "training", "evaluating", "deploying", "finishing"]
# The crash points of the table -> the fault point just after that write. The marker is written
# before the claim's rename (so a crash between them is always seen), so "marker" comes first.
TORN = {
    "marker": "claim",
    "claim": "claimed",
    "result": "result",
    "inbox copy": "finishing",
    "current switch": "switch",
}
# The worker tests' kernel, with no bar on acquisition: a fault trial measures recovery, not learning.
LENIENT = WORKER_LENIENT | {"min_acquisition_em": 0.0}
FINAL = ("deployed", "rejected", "failed", "cancelled")
END_WITHIN_S = 60.0  # the target: a run ends (or resumes to an end) this soon after a fault
STUCK_AFTER_S = 300.0  # a run not ended by then counts as stuck; between the two, as late (machine load)
SIGTERM_TRIALS = 3


def tiny_model(root: Path) -> tuple[Path, Path]:
    """The tests' tiny random Llama as a model directory, and its baseline cache, built once."""
    import torch

    from learning.anchors import ensure_baseline
    from learning.model_loading import load_base
    from tests.learning.conftest import make_model, make_tokenizer

    torch.set_num_threads(1)  # a tiny model: threads only add contention
    model_dir, cache = root / "model", root / "cache"
    if not (model_dir / "config.json").exists():
        tokenizer = make_tokenizer()
        make_model(tokenizer).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    model, tok = load_base(model_dir)
    ensure_baseline(model, tok, model_dir, cache)
    return model_dir, cache


@dataclass
class Home:
    """One ENGRAIN_HOME with its processes; the MCP server runs in this process."""

    path: Path
    model: Path
    cache: Path
    controller: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "cache").exists():
            shutil.copytree(self.cache, self.path / "cache")
        self.fault_dir = self.path.parent / f"{self.path.name}-faults"
        self.fault_dir.mkdir(exist_ok=True)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "ENGRAIN_HOME": str(self.path),
            "ENGRAIN_BASE_MODEL": str(self.model),
            "ENGRAIN_HOST_PORT": str(self.port),
            "ENGRAIN_EMBEDDED_SERVICES": "false",
            "ENGRAIN_HOST_CONTROLLER": self.controller,
            "ENGRAIN_TORCH_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }

    def settings(self) -> Settings:
        return Settings(home=self.path, base_model=str(self.model), host_port=self.port, embedded_services=False)

    def start(self, command: str, **extra: str) -> subprocess.Popen[bytes]:
        log = (self.path.parent / f"{self.path.name}-{command}.log").open("ab")
        proc = subprocess.Popen([ENGRAIN, command], env={**self.env, **extra}, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def run(self, command: str, **extra: str) -> int:
        log = (self.path.parent / f"{self.path.name}-{command}.log").open("ab")
        try:
            return subprocess.run([ENGRAIN, command], env={**self.env, **extra}, stdout=log, stderr=log).returncode
        finally:
            log.close()

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc)

    def health(self) -> dict[str, Any] | None:
        token, _ = load_or_create_token(self.settings())
        try:
            response = httpx.get(
                f"http://127.0.0.1:{self.port}/health", headers={"Authorization": f"Bearer {token}"}, timeout=1
            )
        except httpx.HTTPError:
            return None
        return dict(response.json()) if response.status_code == 200 else None

    def serving(self) -> bool:
        return (self.health() or {}).get("status") == "ok"

    def fault_env(self, fault: str) -> dict[str, str]:
        ready, once = self.fault_dir / "ready", self.fault_dir / "once"
        ready.unlink(missing_ok=True)
        once.unlink(missing_ok=True)
        return {"ENGRAIN_FAULT": fault, "ENGRAIN_FAULT_READY": str(ready), "ENGRAIN_FAULT_ONCE": str(once)}

    def ready_pid(self, within: float = 180) -> int:
        ready = self.fault_dir / "ready"
        wait_until(lambda: ready.exists() and len(ready.read_text().split()) == 2, within, "the fault point")
        return int(ready.read_text().split()[1])


def wait_until(check: Callable[[], Any], within: float, what: str, every: float = 0.05) -> Any:
    return wait_for(check, within=within, every=every, what=what)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/status").exists() and "zombie" in Path(f"/proc/{pid}/status").read_text()


def db_rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with sqlite3.connect(db) as raw:
        return list(raw.execute(sql, params))


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {result.content}")
    return dict(result.structured_content or {})


async def status(client: Client, run_id: str) -> dict[str, Any]:
    return dict((await call(client, "training_status", run_id=run_id))["run"])


async def ended(client: Client, run_id: str, within: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        run = await status(client, run_id)
        if run["status"] in FINAL:
            return run
        await anyio.sleep(0.2)
    return None


class Suite:
    def __init__(self, work: Path, trials: int) -> None:
        self.work = work
        self.trials_per = trials
        self.model, self.cache = tiny_model(work / "tiny")
        self.records: list[dict[str, Any]] = []
        self.controller = "lease"
        self.facts = 0
        self.opened: list[Home] = []

    def home(self, name: str) -> Home:
        home = Home(self.work / name, self.model, self.cache, self.controller)
        self.opened.append(home)
        return home

    def new_facts(self, n: int = 4) -> list[dict[str, str]]:
        start, self.facts = self.facts, self.facts + n
        words = ["zub", "kel", "mor", "tav", "pim", "rok", "sul", "dax"]
        return [
            {"prompt": f"Code q{i}?", "response": f"It is {words[i % 8]}.", "key_answer": words[i % 8]}
            for i in range(start, start + n)
        ]

    async def prepare(self, client: Client, kernel: str = "tiny") -> None:
        kernels = {k["name"] for k in (await call(client, "list_kernels"))["kernels"]}
        if kernel not in kernels:
            await call(client, "create_kernel", name=kernel, settings=TINY, gates=LENIENT)

    def record(self, row: str, case: str, **fields: Any) -> None:
        entry = {"row": row, "case": case, **fields}
        self.records.append(entry)
        print(json.dumps(entry), flush=True)

    # -- kill -9 and SIGTERM in each phase -----------------------------------------------------

    async def phase_faults(self, row: str, phases: list[str]) -> None:
        for phase in phases:
            home = self.home(f"{row}-{phase}")
            host = home.start("host")
            wait_until(home.serving, 120, "the host")
            async with Client(create_server(home.settings())) as client:
                await self.prepare(client)
                watcher = home.start("watch", **home.fault_env(f"pause:{phase}"))
                for trial in range(self.trials_per if row == "kill" else SIGTERM_TRIALS):
                    await self._phase_trial(row, phase, trial, home, client)
                home.stop(watcher)
            home.stop(host)
            home.close()

    async def _phase_trial(self, row: str, phase: str, trial: int, home: Home, client: Client) -> None:
        layout = home.settings().layout
        facts = self.new_facts()
        await call(client, "record_experiences", kernel="tiny", items=facts)
        recorded = len(db_rows(layout.db, "SELECT id FROM experiences WHERE kernel = 'tiny'"))
        if phase == "baseline":
            for cached in (layout.cache / "baselines").glob("*.json"):
                cached.unlink()
        (home.fault_dir / "once").unlink(missing_ok=True)
        (home.fault_dir / "ready").unlink(missing_ok=True)
        run_id = (await call(client, "train_model", kernel="tiny"))["run_id"]
        pid = await anyio.to_thread.run_sync(home.ready_pid)
        host_was_down = not home.serving()
        hit = time.monotonic()
        os.kill(pid, signal.SIGKILL if row == "kill" else signal.SIGTERM)
        await anyio.to_thread.run_sync(lambda: wait_until(lambda: gone(pid), 120, "the worker to exit"))
        exit_s = time.monotonic() - hit
        host_back_s = 0.0
        if host_was_down or not home.serving():
            await anyio.to_thread.run_sync(lambda: wait_until(home.serving, END_WITHIN_S, "the host", every=0.02))
            host_back_s = time.monotonic() - hit
        run = await ended(client, run_id, STUCK_AFTER_S)
        kept = len(db_rows(layout.db, "SELECT id FROM experiences WHERE kernel = 'tiny'"))
        untrained = (await call(client, "list_kernels"))["kernels"]
        self.record(
            row,
            phase,
            trial=trial,
            run=run_id,
            status=run["status"] if run else "stuck",
            error=run["error"] if run else None,
            ended_within_s=round(time.monotonic() - hit, 2) if run else None,
            stuck=run is None,
            lost_experiences=recorded - kept,
            untrained_after=next(k["untrained"] for k in untrained if k["name"] == "tiny"),
            host_was_down=host_was_down,
            host_down_after_s=round(host_back_s, 3),
            exit_s=round(exit_s, 3),
        )

    # -- a crash exactly between two writes ----------------------------------------------------

    async def torn(self) -> None:
        for label, point in TORN.items():
            home = self.home(f"torn-{point}")
            async with Client(create_server(home.settings())) as client:
                await self.prepare(client)
                watcher = home.start("watch", **home.fault_env(f"kill:{point}"))
                for trial in range(self.trials_per):
                    (home.fault_dir / "once").unlink(missing_ok=True)
                    await call(client, "record_experiences", kernel="tiny", items=self.new_facts())
                    run_id = (await call(client, "train_model", kernel="tiny"))["run_id"]
                    started = time.monotonic()
                    run = await ended(client, run_id, STUCK_AFTER_S)
                    layout = home.settings().layout
                    versions = sorted(p.name for p in (layout.kernel_dir("tiny") / "versions").iterdir())
                    link = layout.kernel_dir("tiny") / "current"
                    current = link.readlink().name if link.is_symlink() else "the bare base"
                    self.record(
                        "torn",
                        label,
                        trial=trial,
                        run=run_id,
                        status=run["status"] if run else "stuck",
                        stuck=run is None,
                        crashed=(home.fault_dir / "once").exists(),
                        ended_within_s=round(time.monotonic() - started, 2),
                        served=current,
                        store_says=await _deployed(client, "tiny"),
                        staging_left=[v for v in versions if v.startswith(".")],
                    )
                home.stop(watcher)
            home.close()

    # -- a torn or invalid copy of every file kind ---------------------------------------------

    async def corrupt(self) -> None:
        home = self.home("corrupt")
        layout = home.settings().layout
        async with Client(create_server(home.settings())) as client:
            await self.prepare(client)

            async def start() -> str:
                await call(client, "record_experiences", kernel="tiny", items=self.new_facts())
                return str((await call(client, "train_model", kernel="tiny"))["run_id"])

            def cut(path: Path, keep: float = 0.5) -> None:
                data = path.read_bytes()
                path.write_bytes(data[: int(len(data) * keep)])

            def null_field(path: Path) -> None:
                data = json.loads(path.read_text())
                data["settings"]["learning_rate"] = None
                path.write_text(json.dumps(data))

            def bad_line(path: Path) -> None:
                with path.open("ab") as fh:
                    fh.write(b'{"kind": "progress", "seq": "x"}\n')  # a line no model accepts

            cases: list[tuple[str, Callable[[str], object]]] = [
                ("pending.json torn", lambda r: cut(layout.pending)),
                ("pending.json invalid", lambda r: null_field(layout.pending)),
                ("batch.jsonl torn", lambda r: cut(layout.run_dir(r) / "batch.jsonl", 0.9)),
                ("manifest.json torn", lambda r: cut(layout.run_dir(r) / "manifest.json")),
                ("state.json torn", lambda r: (layout.run_dir(r) / "state.json").write_text('{"schema_ver')),
                ("training.lease torn", lambda r: write_atomic(layout.lease, b'{"kind": "training_le')),
                ("events.jsonl bad line", lambda r: bad_line(layout.run_dir(r) / "events.jsonl")),
            ]
            for label, damage in cases:
                run_id = await start()
                await anyio.to_thread.run_sync(damage, run_id)
                await self._settle(client, home, run_id, label)
            # Files written by the worker, damaged after it wrote them.
            # Files the worker writes, torn by the crash that interrupted their writing.
            for label, point in [
                ("result inbox copy torn", "finishing"),
                ("result.json torn (no good copy left)", "result"),
                ("deploy.json torn", "deploying"),
            ]:
                run_id = await start()
                env = home.fault_env(f"tear:{point}")
                await anyio.to_thread.run_sync(functools.partial(home.run, "worker", **env))
                await self._settle(client, home, run_id, label)
        home.close()

    async def _settle(self, client: Client, home: Home, run_id: str, label: str, *, worker: bool = True) -> None:
        layout = home.settings().layout
        before = set(layout.quarantine.glob("*.reason.txt"))
        started = time.monotonic()
        for _ in range(4):  # a worker per round, as the path unit would start them
            if worker:
                await anyio.to_thread.run_sync(lambda: home.run("worker"))
            run = await ended(client, run_id, 5)
            if run is not None:
                break
        else:
            run = None
        await anyio.sleep(1.0)
        new = sorted(set(layout.quarantine.glob("*.reason.txt")) - before)
        quarantined = [p.read_text().strip()[:160] for p in new]
        recorded = db_rows(layout.db, "SELECT count(*) FROM quarantine")[0][0]
        self.record(
            "corrupt",
            label,
            run=run_id,
            status=run["status"] if run else "stuck",
            error=(run or {}).get("error"),
            stuck=run is None,
            quarantined=len(new),
            reasons=quarantined[:2],
            quarantine_rows=recorded,
            pending_after=layout.pending.exists(),
            seconds=round(time.monotonic() - started, 2),
        )

    # -- 100 concurrent train_model calls over two servers -------------------------------------

    async def race(self) -> None:

        home = self.home("race")
        token = "bench-token-" + os.urandom(8).hex()
        ports = [free_port(), free_port()]
        for p in ports:
            _serve_http(home, p, token)
        async with Client(create_server(home.settings())) as local:
            await self.prepare(local)
            for trial in range(3):
                await call(local, "record_experiences", kernel="tiny", items=self.new_facts())
                ids: list[str] = []
                errors: list[str] = []
                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    for i in range(10):
                        tg.start_soon(_race_session, ports[i % 2], token, 10, ids, errors)
                active = db_rows(
                    home.settings().layout.db,
                    "SELECT count(*) FROM runs WHERE kernel = 'tiny' AND status IN"
                    " ('queued', 'requested', 'running', 'evaluating')",
                )[0][0]
                self.record(
                    "race",
                    f"trial {trial}",
                    calls=len(ids) + len(errors),
                    distinct_run_ids=len(set(ids)),
                    errors=errors[:3],
                    active_runs=active,
                    seconds=round(time.monotonic() - started, 2),
                )
                for run_id in set(ids):
                    await call(local, "cancel_training", run_id=run_id)
        home.close()

    # -- two homes -----------------------------------------------------------------------------

    async def homes(self) -> None:
        a, b = self.home("home-a"), self.home("home-b")
        for home in (a, b):
            home.start("host")
            home.start("watch")
        wait_until(lambda: a.serving() and b.serving(), 120, "both hosts")
        async with Client(create_server(a.settings())) as ca, Client(create_server(b.settings())) as cb:
            for client, kernel, trainer, other in ((ca, "alpha", a, b), (cb, "beta", b, a)):
                await self.prepare(client, kernel)
                await call(client, "record_experiences", kernel=kernel, items=self.new_facts())
                run_id = (await call(client, "train_model", kernel=kernel))["run_id"]
                seen_trainer: set[str] = set()
                seen_other: set[str] = set()
                deadline = time.monotonic() + 180
                run = None
                while run is None and time.monotonic() < deadline:
                    seen_trainer.add(str((trainer.health() or {}).get("status")))
                    seen_other.add(str((other.health() or {}).get("status")))
                    run = await ended(client, run_id, 0.1)
                self.record(
                    "homes",
                    f"training in {trainer.path.name}",
                    status=run["status"] if run else "stuck",
                    stuck=run is None,
                    trainer_host_states=sorted(seen_trainer),
                    other_host_states=sorted(seen_other),
                    cross_talk=seen_other != {"ok"},
                )
            wait_until(lambda: a.serving() and b.serving(), 60, "both hosts back")
            qa = await call(ca, "query_kernel", kernel="alpha", prompt="Code q0?", max_new_tokens=8)
            qb = await call(cb, "query_kernel", kernel="beta", prompt="Code q4?", max_new_tokens=8)
            self.record("homes", "each home queries its own host", a_serves=qa["version"], b_serves=qb["version"])
        # A misconfiguration: a third home pointed at home A's host port.
        c = self.home("home-c")
        c.port = a.port
        clash = c.start("host")
        try:
            clash.wait(120)
        except subprocess.TimeoutExpired:
            c.stop(clash)
        log = (c.path.parent / f"{c.path.name}-host.log").read_text(errors="replace")[-400:]
        async with Client(create_server(c.settings())) as cc:
            await self.prepare(cc, "gamma")
            answer = await cc.call_tool("query_kernel", {"kernel": "gamma", "prompt": "Hi?"})
        self.record(
            "homes",
            "a third home on the first home's port",
            host_exit=clash.returncode,
            host_log_tail=log,
            query=(answer.content[0].text if answer.is_error else "answered by another home's host")[:300],  # type: ignore[union-attr]
        )
        for home in (a, b, c):
            home.close()

    # -- a full disk while deploying -----------------------------------------------------------

    async def enospc(self) -> None:
        home = self.home("enospc")
        home.start("host")
        wait_until(home.serving, 120, "the host")
        async with Client(create_server(home.settings())) as client:
            await self.prepare(client)
            await call(client, "record_experiences", kernel="tiny", items=self.new_facts())
            first = (await call(client, "train_model", kernel="tiny"))["run_id"]
            await anyio.to_thread.run_sync(lambda: home.run("worker"))
            await ended(client, first, 60)
            await call(client, "record_experiences", kernel="tiny", items=self.new_facts())
            second = (await call(client, "train_model", kernel="tiny"))["run_id"]
            await anyio.to_thread.run_sync(lambda: home.run("worker", **home.fault_env("enospc:deploying")))
            run = await ended(client, second, 60)
            wait_until(home.serving, 60, "the host")
            answer = await call(client, "query_kernel", kernel="tiny", prompt="Code q0?", max_new_tokens=8)
            self.record(
                "enospc",
                "disk full while deploying",
                status=run["status"] if run else "stuck",
                error=(run or {}).get("error"),
                serves_version=answer["version"],
                stuck=run is None,
            )
        home.close()

    # -- fuzz ----------------------------------------------------------------------------------

    async def fuzz(self, examples: int) -> None:
        from bench.fuzz import fuzz_tools

        home = self.home("fuzz")
        async with Client(create_server(home.settings())) as client:
            await call(client, "create_kernel", name="fuzz")
            await call(client, "record_experience", kernel="fuzz", prompt="Q?", response="A.")
            started = time.monotonic()
            report = await fuzz_tools(client, home.settings().layout.db, examples)
        self.record("fuzz", f"{examples} per tool", **report.summary(), seconds=round(time.monotonic() - started, 1))

    # -- 8 concurrent MCP-over-HTTP clients x 1000 records -------------------------------------

    async def record_load(self, clients: int = 8, each: int = 1000) -> None:
        from mcp.client.streamable_http import streamable_http_client

        home = self.home("record")
        token = "bench-token-" + os.urandom(8).hex()
        port = free_port()
        _serve_http(home, port, token)
        latencies: list[float] = []
        errors: list[str] = []

        async def client_(n: int) -> None:
            headers = {"Authorization": f"Bearer {token}"}
            async with httpx2.AsyncClient(headers=headers, timeout=120) as http:
                transport = streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)
                async with Client(transport) as remote:
                    for i in range(each):
                        args = {
                            "kernel": "default",
                            "prompt": f"Load {n}-{i}?",
                            "response": f"Answer {n}-{i}.",
                            "idempotency_key": f"c{n}-{i}",
                        }
                        started = time.perf_counter()
                        result = await remote.call_tool("record_experience", args)
                        latencies.append(time.perf_counter() - started)
                        if result.is_error:
                            errors.append(str(result.content)[:200])
                        if i % 100 == 0:  # a retry with the same key must not store twice
                            await remote.call_tool("record_experience", args)

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            for n in range(clients):
                tg.start_soon(client_, n)
        wall = time.monotonic() - started
        stored = db_rows(home.settings().layout.db, "SELECT count(*) FROM experiences WHERE kernel = 'default'")[0][0]
        ordered = sorted(latencies)
        self.record(
            "record",
            f"{clients} clients x {each} records",
            stored=stored,
            expected=clients * each,
            errors=len(errors),
            p50_ms=round(1000 * statistics.median(ordered), 2),
            p99_ms=round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2),
            records_per_s=round(clients * each / wall, 1),
        )
        home.close()

    def summary(self) -> dict[str, Any]:
        phase_rows = [r for r in self.records if r["row"] in ("kill", "sigterm", "torn", "corrupt", "enospc")]
        kills = [r for r in self.records if r["row"] == "kill"]
        terms = [r for r in self.records if r["row"] == "sigterm"]
        fuzz = next((r for r in self.records if r["row"] == "fuzz"), {})
        ends = [r["ended_within_s"] for r in kills + terms if r.get("ended_within_s") is not None]
        return {
            "trials": len(self.records),
            "lost_experiences": sum(r.get("lost_experiences", 0) for r in self.records),
            "stuck_runs": sum(1 for r in phase_rows if r.get("stuck")),
            "run_end_after_fault_s_max": max(ends, default=None),
            "runs_ending_later_than_60_s": sum(1 for e in ends if e > END_WITHIN_S),
            "host_down_after_s_max": max((r["host_down_after_s"] for r in kills), default=None),
            "sigterm_exit_s_max": max((r["exit_s"] for r in terms), default=None),
            "fuzz_cases": fuzz.get("cases", 0),
        }


async def _race_session(port: int, token: str, calls: int, ids: list[str], errors: list[str]) -> None:
    """One MCP-over-HTTP session making `calls` concurrent train_model calls."""
    from mcp.client.streamable_http import streamable_http_client

    async def one(remote: Client) -> None:
        result = await remote.call_tool("train_model", {"kernel": "tiny"})
        if result.is_error:
            errors.append(str(result.content)[:200])
        else:
            ids.append(str((result.structured_content or {})["run_id"]))

    headers = {"Authorization": f"Bearer {token}"}
    url = f"http://127.0.0.1:{port}/mcp"
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http,
        Client(streamable_http_client(url, http_client=http)) as remote,
        anyio.create_task_group() as tg,
    ):
        for _ in range(calls):
            tg.start_soon(one, remote)


def _serve_http(home: Home, port: int, token: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [ENGRAIN, "serve", "--http", "--port", str(port)],
        env={**home.env, "ENGRAIN_TOKEN": token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    home.procs.append(proc)
    wait_until(functools.partial(_http_up, port), 60, "an MCP server")
    return proc


async def _deployed(client: Client, kernel: str) -> str:
    kernels = (await call(client, "list_kernels"))["kernels"]
    return f"v{next(k['deployed_version'] for k in kernels if k['name'] == kernel)}"


def _http_up(port: int) -> bool:
    try:
        httpx.get(f"http://127.0.0.1:{port}/mcp", timeout=0.5)
    except httpx.HTTPError:
        return False
    return True


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="engrain-faults-"))
    suite = Suite(work, args.trials)
    suite.controller = args.controller
    command = "python -m bench.faults " + " ".join(sys.argv[1:])
    earlier: dict[str, Any] = {}
    if args.merge and args.out.exists():
        # Rows run in pieces (the full counts take hours): keep the file's other rows, replace these.
        earlier = json.loads(args.out.read_text())
        if earlier.get("controller") != args.controller:
            raise SystemExit(f"{args.out} was measured with the {earlier.get('controller')} controller; not merging")
        suite.records = [r for r in earlier["records"] if r["row"] not in args.rows]
        command = f"{earlier['command']} && {command}"
    started = time.monotonic()
    try:
        for row in args.rows:
            if row in ("kill", "sigterm"):
                await suite.phase_faults(row, args.phases)
            elif row == "torn":
                await suite.torn()
            elif row == "corrupt":
                await suite.corrupt()
            elif row == "race":
                await suite.race()
            elif row == "homes":
                await suite.homes()
            elif row == "enospc":
                await suite.enospc()
            elif row == "fuzz":
                await suite.fuzz(args.fuzz_examples)
            elif row == "record":
                await suite.record_load(each=args.records)
    finally:
        for home in suite.opened:  # a row that failed or was stopped leaves no host or watcher behind
            home.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return {
        **suite.summary(),
        "command": command,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared",
        "controller": suite.controller,
        "wall_s": round(time.monotonic() - started + earlier.get("wall_s", 0.0), 1),
        "records": suite.records,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    rows = ["kill", "sigterm", "torn", "corrupt", "race", "homes", "enospc", "fuzz", "record"]
    parser.add_argument("--rows", nargs="+", default=rows, choices=rows)
    parser.add_argument("--phases", nargs="+", default=PHASES, choices=PHASES)
    parser.add_argument("--trials", type=int, default=5, help="trials per phase for kill and per torn point")
    parser.add_argument("--fuzz-examples", type=int, default=1000)
    parser.add_argument("--records", type=int, default=1000, help="records per client in the record row")
    parser.add_argument("--controller", default="lease", choices=["lease", "http"])
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, homes)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--merge", action="store_true", help="replace only these rows' records in --out")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so the clean-up above runs
    result = anyio.run(main_async, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "records"}, indent=1))


if __name__ == "__main__":
    main()
