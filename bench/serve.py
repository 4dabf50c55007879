"""Serving benchmarks on the embedded model, each a ratio to a baseline measured in the same run.

1. One request through the host (HTTP) against plain transformers `generate` on the same model, prompt
   and token count: generation tokens/s ratio (goal >= 0.9). Measured on the bare base and with an adapter.
2. Eight concurrent `query_kernel` calls (MCP in-memory client -> host): total tokens/s as a ratio to
   one call at a time (goal >= 3.5).
3. Deploying a new adapter version into the running host against a full model reload (load the base
   from safetensors and attach the adapter): time ratio (goal <= 0.1).
4. Switching between kernels resident in the host: milliseconds per switch (goal <= 25).
5. Wall time from `train_model` to deployed for 16 experiences, through the watcher and worker (reported).

    .venv/bin/python -m bench.serve [--home DIR] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import torch
from mcp import Client
from peft import PeftModel, get_peft_model

from learning import lora
from learning.config import AdapterSettings
from learning.formatting import encode_prompt
from learning.generate import generate_ids
from learning.model_loading import ensure_base_model, load_base, setup_threads
from server.app import create_server
from train_worker.deploy import KernelFiles
from train_worker.protocol import VersionMeta, write_model
from train_worker.settings import Settings

RESULTS = Path(__file__).with_name("results") / "serve.json"
PROMPT = "Explain in a few sentences why the sky is blue."
TOKENS = 64
CONCURRENT = [
    "Explain in a few sentences why the sky is blue.",
    "Write a short paragraph about the history of bread.",
    "Describe how a bicycle works.",
    "What are the benefits of regular exercise? Answer in detail.",
    "Explain what a computer program is to a child.",
    "Describe the water cycle in a few sentences.",
    "Why do leaves change color in autumn? Explain.",
    "Write a short story about a lighthouse keeper.",
]


def _median_rate(fn: Any, reps: int) -> tuple[float, int]:
    """Median tokens/s of `fn()` (which returns a token count) over `reps` runs, after one warm-up."""
    fn()
    rates, tokens = [], 0
    for _ in range(reps):
        t0 = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - t0))
    return statistics.median(rates), tokens


def make_version(settings: Settings, kernel: str, version: int, model_dir: Path, seed: int) -> Path:
    """A random adapter shaped like a default kernel's, installed as a version."""
    base, _ = load_base(model_dir)
    torch.manual_seed(seed)
    config = lora.lora_config(AdapterSettings())
    config.init_lora_weights = False
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # small weights, so answers stay fluent
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    files = KernelFiles(settings.layout, kernel)
    staged = files.versions_dir / f".v{version}.staging"
    peft_model.save_pretrained(str(staged))
    meta = VersionMeta(
        kernel=kernel,
        version=version,
        run_id=f"r-20261123T200000-00000{version}",
        parent_version=None,
        base_model="embedded",
        created_at=datetime.now(UTC),
    )
    write_model(staged / "meta.json", meta)
    return files.install(staged, version)


class Host:
    def __init__(self, settings: Settings, env: dict[str, str], log: Path) -> None:
        self.url = f"http://{settings.host_address}:{settings.host_port}"
        cmd = [sys.executable, "-m", "server.cli", "host"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            health = self.health()
            if health and health["status"] == "ok":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the host did not come up; see {log}")

    def health(self) -> dict[str, Any] | None:
        try:
            r = httpx.get(f"{self.url}/health", timeout=2)
        except httpx.HTTPError:
            return None
        return dict(r.json()) if r.status_code == 200 else None

    def chat(self, kernel: str, prompt: str, tokens: int) -> int:
        body = {"model": kernel, "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens}
        r = httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def bench_single(host: Host, model_dir: Path, adapter: Path, reps: int) -> dict[str, Any]:
    base, tok = load_base(model_dir)
    ids = encode_prompt(tok, PROMPT)
    out: dict[str, Any] = {}
    for label, kernel, model in (
        ("base", "default", base),
        ("adapter", "bench", PeftModel.from_pretrained(base, str(adapter))),
    ):
        plain, n_plain = _median_rate(lambda m=model: len(generate_ids(m, tok, [ids], max_new_tokens=TOKENS)[0]), reps)
        served, n_served = _median_rate(lambda k=kernel: host.chat(k, PROMPT, TOKENS), reps)
        assert n_plain == n_served, f"host and plain generated different lengths ({n_served} vs {n_plain})"
        out[label] = {"host_tok_s": served, "plain_tok_s": plain, "ratio": served / plain, "tokens": n_served}
        print(f"single request ({label}): host {served:.1f} tok/s, plain generate {plain:.1f} tok/s, "
              f"ratio {served / plain:.2f} (goal >= 0.9)")  # fmt: skip
    return out


async def bench_concurrent(settings: Settings, reps: int) -> dict[str, Any]:
    async with Client(create_server(settings)) as client:

        async def ask(prompt: str) -> int:
            r = await client.call_tool(
                "query_kernel", {"kernel": "default", "prompt": prompt, "max_new_tokens": TOKENS}
            )
            assert not r.is_error, r.content
            return int((r.structured_content or {})["completion_tokens"])

        await ask(CONCURRENT[0])  # warm-up
        singles, totals = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            n = 0
            for p in CONCURRENT:
                n += await ask(p)
            singles.append(n / (time.perf_counter() - t0))
            counts: list[int] = []

            async def one(prompt: str, into: list[int] = counts) -> None:
                into.append(await ask(prompt))

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for p in CONCURRENT:
                    tg.start_soon(one, p)
            totals.append(sum(counts) / (time.perf_counter() - t0))
    single, total = statistics.median(singles), statistics.median(totals)
    print(f"8 concurrent query_kernel: {total:.1f} tok/s in total, one at a time {single:.1f} tok/s, "
          f"ratio {total / single:.2f} (goal >= 3.5)")  # fmt: skip
    return {"single_tok_s": single, "concurrent_8_tok_s": total, "ratio": total / single}


def bench_deploy(settings: Settings, host: Host, model_dir: Path, reps: int) -> dict[str, Any]:
    files = KernelFiles(settings.layout, "bench")
    swaps, visible = [], []
    version = max(files.versions())
    for i in range(reps):
        version += 1
        make_version(settings, "bench", version, model_dir, seed=100 + i)
        t0 = time.perf_counter()
        with files.locked():
            files.switch(version)
        host.chat("bench", "Hi", 1)  # the first query after a deploy is served by the new version
        visible.append(time.perf_counter() - t0)
        health = host.health() or {}
        assert health["kernels"]["bench"] == version, health
        swaps.append(health["last_deploy_ms"] / 1000)
    reloads = []
    for _ in range(reps):
        t0 = time.perf_counter()
        base, _ = load_base(model_dir)
        PeftModel.from_pretrained(base, str(files.version_dir(version)))
        reloads.append(time.perf_counter() - t0)
    swap, reload = statistics.median(swaps), statistics.median(reloads)
    first = statistics.median(visible)
    print(f"deploy into the running host: {swap * 1000:.0f} ms (first query after it: {first:.2f} s incl. 1 token);"
          f" full reload {reload * 1000:.0f} ms; ratio {swap / reload:.3f} (goal <= 0.1)")  # fmt: skip
    return {"swap_s": swap, "first_query_after_deploy_s": first, "full_reload_s": reload, "ratio": swap / reload}


def bench_switch(model_dir: Path, adapters: list[Path], switches: int = 200) -> dict[str, Any]:
    """The host's switch is peft's set_adapter between resident adapters; timed in-process, as it runs there."""
    base, _ = load_base(model_dir)
    model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="a", is_trainable=False)
    model.load_adapter(str(adapters[1]), adapter_name="b", is_trainable=False)
    t0 = time.perf_counter()
    for i in range(switches):
        model.set_adapter("a" if i % 2 else "b")
    per = (time.perf_counter() - t0) / switches * 1000
    print(f"switch between resident kernels: {per:.1f} ms (goal <= 25)")
    return {"ms_per_switch": per}


async def bench_train(settings: Settings, watcher: subprocess.Popen[bytes]) -> dict[str, Any]:
    facts_path = Path(__file__).with_name("data") / "facts.json"
    facts = json.loads(facts_path.read_text())["rounds"][0][:16]
    items = [{k: f[k] for k in ("prompt", "response", "key_answer", "paraphrases")} for f in facts]
    try:
        async with Client(create_server(settings)) as client:
            await client.call_tool("create_kernel", {"name": "timing"})
            await client.call_tool("record_experiences", {"kernel": "timing", "items": items})
            t0 = time.perf_counter()
            started = await client.call_tool("train_model", {"kernel": "timing"})
            run_id = (started.structured_content or {})["run_id"]
            while True:
                r = await client.call_tool("training_status", {"run_id": run_id})
                run = (r.structured_content or {})["run"]
                if run["status"] in ("deployed", "rejected", "failed", "cancelled"):
                    break
                await anyio.sleep(1)
            wall = time.perf_counter() - t0
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(120)
    print(f"train_model -> {run['status']} for 16 experiences: {wall:.0f} s wall time")
    return {"experiences": 16, "status": run["status"], "wall_s": wall, "metrics": run["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="reuse this ENGRAIN_HOME's model and baseline cache")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true", help="skip the train_model -> deployed timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    setup_threads(None)

    work = Path(tempfile.mkdtemp(prefix="engrain-serve-bench-"))
    settings = Settings(home=work / "home", host_port=18765, embedded_services=False, host_controller="http")
    settings.layout.ensure()
    if args.home:  # the dequantised model and the baseline are slow to rebuild: reuse them
        for name in ("models", "cache"):
            if (args.home / name).is_dir():
                shutil.copytree(args.home / name, settings.layout.home / name, dirs_exist_ok=True)
    env = {**os.environ, "ENGRAIN_HOME": str(settings.layout.home), "ENGRAIN_HOST_PORT": "18765",
           "ENGRAIN_EMBEDDED_SERVICES": "false", "ENGRAIN_HOST_CONTROLLER": "http", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    os.environ.update({k: v for k, v in env.items() if k.startswith("ENGRAIN_")})
    model_dir = ensure_base_model(None, settings.layout.models)
    adapters = [make_version(settings, "bench", 1, model_dir, seed=1), make_version(settings, "other", 1, model_dir, 2)]
    KernelFiles(settings.layout, "bench").switch(1)
    KernelFiles(settings.layout, "other").switch(1)

    report: dict[str, Any] = {"model": model_dir.name, "threads": torch.get_num_threads(), "tokens": TOKENS}
    host = Host(settings, env, work / "host.log")
    try:
        report["single_request"] = bench_single(host, model_dir, adapters[0], args.reps)
        report["concurrent_8"] = anyio.run(bench_concurrent, settings, args.reps)
        report["deploy"] = bench_deploy(settings, host, model_dir, args.reps)
    finally:
        host.stop()
    report["switch"] = bench_switch(model_dir, adapters)
    if not args.skip_train:
        host = Host(settings, env, work / "host2.log")
        watch_log = (work / "watch.log").open("wb")
        cmd = [sys.executable, "-m", "server.cli", "watch"]
        watcher = subprocess.Popen(cmd, env=env, stdout=watch_log, stderr=subprocess.STDOUT)
        try:
            report["train_to_deployed"] = anyio.run(bench_train, settings, watcher)
        finally:
            host.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} (logs in {work})")


if __name__ == "__main__":
    main()
