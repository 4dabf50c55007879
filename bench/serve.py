"""Serving benchmarks on the embedded model: the host's fast backend against raw llama.cpp, in one run.

A fresh home; a kernel trained on 16 made-up facts by the real worker; then `engrain host` processes, each
figure measured against its baseline in the same run, alternating, median of `--reps` after a warm-up:

1. single-stream decode, the kernel (its adapter) through the host, against raw llama.cpp (llama-cpp-python's
   `Llama`) on the bare base, same GGUF, same threads, 64 greedy tokens: tokens/s ratio (goal >= 0.8);
2. 8 concurrent requests against the same 8 one at a time, total tokens/s (goal >= 3.5), with raw llama.cpp's
   own ratio on the same weights beside it (the 8 prompts as one multi-sequence batch against one at a time);
3. greedy agreement with the fp32 reference (transformers + peft on the dequantised model, as the worker
   evaluates it) on the general probes (`learning/data/probes.json`) and the 16 trained facts, 64 tokens:
   share of identical answers (goal >= 98%), and trained facts still answered;
4. deploy into the running host: `current` switched to a new version until a query answers from it, while
   three clients keep querying (goal <= 5 s, no failed query);
5. time to first token for a 200-token prompt, raw llama.cpp's beside it (both from a cold cache);
6. `query_kernel` through MCP, p50 for a 40-token answer.

The weight type a host serves by default (`ENGRAIN_HOST_GGUF_TYPE`) gives the headline figures (4 and 6 are
measured on it alone); each other type in `--gguf-types` gets its own host and rows 1-3 and 5. The transformers
backend's single stream is measured too, for reference.

    .venv/bin/python -m bench.serve [--home DIR] [--threads 2] [--gguf-types as-shipped,f16,f32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
from mcp import Client
from safetensors.numpy import load_file, save_file

from host.endpoint import read_endpoint
from learning.formatting import encode_prompt
from learning.generate import generate_ids
from learning.model_loading import embedded_gguf_path, ensure_base_model, load_base, setup_threads
from learning.scoring import contains
from server.app import create_server
from train_worker.auth_token import load_or_create_token
from train_worker.deploy import KernelFiles
from train_worker.settings import Settings

RESULTS = Path(__file__).with_name("results") / "serve.json"
DATA = Path(__file__).with_name("data") / "facts.json"
PROBES = Path(__file__).resolve().parents[1] / "learning" / "data" / "probes.json"
KERNEL = "facts"
TOKENS = 64
LONG = "Write a long story about a lighthouse keeper and the storms she has seen."
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


def log(message: str) -> None:
    print(message, flush=True)


class Host:
    """An `engrain host` process and an HTTP client for it (found through host.json, with the token)."""

    def __init__(self, settings: Settings, env: dict[str, str], logfile: Path) -> None:
        self.settings = settings
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "host"], env=env, stdout=logfile.open("wb"), stderr=subprocess.STDOUT
        )
        self.headers = {"Authorization": f"Bearer {load_or_create_token(settings)[0]}"}
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            endpoint = read_endpoint(settings.layout)
            if endpoint is not None and endpoint.pid == self.proc.pid and (self.health() or {}).get("status") == "ok":
                self.url = endpoint.url
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"the host did not come up; see {logfile}")

    def health(self) -> dict[str, Any] | None:
        endpoint = read_endpoint(self.settings.layout)
        if endpoint is None:
            return None
        try:
            r = httpx.get(f"{endpoint.url}/health", headers=self.headers, timeout=5)
        except httpx.HTTPError:
            return None
        return dict(r.json()) if r.status_code == 200 else None

    def body(self, prompt: str, tokens: int, **extra: Any) -> dict[str, Any]:
        return {
            "model": KERNEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens,
            "temperature": 0,
        } | extra

    def chat(self, prompt: str, tokens: int, **extra: Any) -> dict[str, Any]:
        r = httpx.post(
            f"{self.url}/v1/chat/completions",
            json=self.body(prompt, tokens, **extra),
            headers=self.headers,
            timeout=600,
        )
        r.raise_for_status()
        return dict(r.json())

    def stream(self, prompt: str, tokens: int) -> tuple[float, float, int]:
        """(seconds to the first text, decode tokens/s after it, tokens) of one streamed greedy answer."""
        body = self.body(prompt, tokens, stream=True, stream_options={"include_usage": True})
        started = time.perf_counter()
        stamps: list[float] = []
        usage = 0
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, headers=self.headers, timeout=600) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
        rate = (usage - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        return stamps[0] - started, rate, usage

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


class RawLlama:
    """The baseline: llama-cpp-python's own `Llama` on a GGUF file, as a user of it would run it."""

    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.gguf, self.threads = gguf, threads

    def run(self, ids: list[int], tokens: int) -> tuple[float, float]:
        """(seconds to the first token, decode tokens/s after it) of `tokens` greedy tokens, from a cold cache:
        `generate` would otherwise reuse the previous call's prompt, as the host never does."""
        self.llm.reset()  # type: ignore[no-untyped-call]
        started = time.perf_counter()
        stamps = []
        for _ in self.llm.generate(ids, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == tokens:
                break
        return stamps[0] - started, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def raw_batched(gguf: Path, threads: int, prompts: list[list[int]], tokens: int) -> dict[str, float]:
    """llama.cpp's own ceiling for 8 concurrent answers: the prompts decoded as one multi-sequence batch (a KV
    cache each, as the host does) against one at a time, `tokens` greedy tokens each, total tokens/s."""
    import llama_cpp as L

    model_params = L.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(gguf).encode(), model_params)
    params = L.llama_context_default_params()
    params.n_seq_max, params.kv_unified, params.n_ctx = len(prompts), False, 1024 * len(prompts)
    params.n_batch, params.n_threads, params.n_threads_batch = 1024 * len(prompts), threads, threads
    ctx = L.llama_init_from_model(model, params)
    batch = L.llama_batch_init(params.n_batch, 0, 1)
    n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))

    def put(i: int, token: int, position: int, seq: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
        batch.seq_id[i][0] = seq

    def answer(group: list[int]) -> int:
        """Greedy answers for the prompts in `group`, decoded together; tokens generated."""
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        n, rows = 0, []
        for seq in group:
            for position, token in enumerate(prompts[seq]):
                put(n, token, position, seq, position == len(prompts[seq]) - 1)
                n += 1
            rows.append(n - 1)
        for step in range(tokens):
            batch.n_tokens = n
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            picked = [
                int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(n_vocab,))))
                for row in rows
            ]
            for i, (seq, token) in enumerate(zip(group, picked, strict=True)):
                put(i, token, len(prompts[seq]) + step, seq, True)
            n, rows = len(group), list(range(len(group)))
        return tokens * len(group)

    def rate(groups: list[list[int]]) -> float:
        started = time.perf_counter()
        done = sum(answer(g) for g in groups)
        return done / (time.perf_counter() - started)

    try:
        ones, together = alternate(
            3, lambda: rate([[i] for i in range(len(prompts))]), lambda: rate([list(range(len(prompts)))])
        )
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    single, total = statistics.median(ones), statistics.median(together)
    return {"single_tok_s": single, "concurrent_8_tok_s": total, "ratio": total / single}


def alternate(reps: int, *fns: Callable[[], Any]) -> list[list[Any]]:
    """Run the functions in turn `reps` times after one warm-up round; each one's results."""
    for fn in fns:
        fn()
    out: list[list[Any]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            out[i].append(fn())
    return out


async def train_kernel(settings: Settings, env: dict[str, str], work: Path) -> dict[str, Any]:
    """16 facts recorded through MCP, trained and deployed by a real `engrain worker`: kernel `facts` v1."""
    facts = json.loads(DATA.read_text())["rounds"][0][:16]
    items = [{k: f[k] for k in ("prompt", "response", "key_answer", "paraphrases")} for f in facts]
    async with Client(create_server(settings)) as client:
        await client.call_tool("create_kernel", {"name": KERNEL})
        await client.call_tool("record_experiences", {"kernel": KERNEL, "items": items})
        started = time.perf_counter()
        run_id = ((await client.call_tool("train_model", {"kernel": KERNEL})).structured_content or {})["run_id"]
        worker = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "server.cli", "worker"],
                env=env,
                stdout=(work / "worker.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        while True:
            run = ((await client.call_tool("training_status", {"run_id": run_id})).structured_content or {})["run"]
            if run["status"] in ("deployed", "rejected", "failed", "cancelled"):
                break
            await anyio.sleep(1)
        wall = time.perf_counter() - started
    log(f"train_model -> {run['status']} for 16 experiences: {wall:.0f} s (worker exit {worker.returncode})")
    if run["status"] != "deployed":
        raise RuntimeError(f"the training run did not deploy: {run}")
    return {"experiences": 16, "status": run["status"], "wall_s": wall, "metrics": run["metrics"]}


def reference(model_dir: Path, adapter: Path, prompts: list[str]) -> list[str]:
    """The fp32 reference: transformers + peft on the dequantised model, greedy, as the worker evaluates."""
    from peft import PeftModel

    base, tok = load_base(model_dir)
    model = PeftModel.from_pretrained(base, str(adapter))
    ids = generate_ids(model, tok, [encode_prompt(tok, p) for p in prompts], max_new_tokens=TOKENS)
    return [str(tok.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False)).strip() for t in ids]


async def host_answers(host: Host, prompts: list[str], tokens: int, parallel: int = 8) -> list[str]:
    limit = asyncio.Semaphore(parallel)
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(prompt: str) -> str:
            async with limit:
                r = await client.post(
                    f"{host.url}/v1/chat/completions", json=host.body(prompt, tokens), headers=host.headers
                )
                r.raise_for_status()
                content: str = r.json()["choices"][0]["message"]["content"]
                return content.strip()

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def agreement(host: Host, questions: list[str], facts: list[dict[str, Any]], ref: list[str]) -> dict[str, Any]:
    answers = asyncio.run(host_answers(host, questions + [f["prompt"] for f in facts], TOKENS))
    n = len(questions)
    same = [a == r for a, r in zip(answers, ref, strict=True)]
    fast_facts = sum(contains(a, f["key_answer"]) for a, f in zip(answers[n:], facts, strict=True))
    ref_facts = sum(contains(r, f["key_answer"]) for r, f in zip(ref[n:], facts, strict=True))
    out = {
        "identical": sum(same) / len(same),
        "identical_probes": sum(same[:n]) / n,
        "identical_facts": sum(same[n:]) / len(facts),
        "facts_answered": fast_facts,
        "facts_answered_reference": ref_facts,
        "facts": len(facts),
        "differing": [
            {"prompt": p, "fast": a, "reference": r}
            for p, a, r, s in zip(questions + [f["prompt"] for f in facts], answers, ref, same, strict=True)
            if not s
        ][:10],
    }
    log(
        f"  greedy agreement with fp32: {out['identical']:.1%} identical (probes {out['identical_probes']:.1%}, "
        f"facts {out['identical_facts']:.1%}); facts answered {fast_facts}/{len(facts)} "
        f"(reference {ref_facts})"
    )
    return out


async def concurrency(host: Host, reps: int) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=600) as client:

        async def ask(prompt: str) -> int:
            r = await client.post(
                f"{host.url}/v1/chat/completions", json=host.body(prompt, TOKENS), headers=host.headers
            )
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        await ask(CONCURRENT[0])
        singles, totals = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            n = 0
            for p in CONCURRENT:
                n += await ask(p)
            singles.append(n / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            counts = await asyncio.gather(*(ask(p) for p in CONCURRENT))
            totals.append(sum(counts) / (time.perf_counter() - t0))
    single, total = statistics.median(singles), statistics.median(totals)
    log(
        f"  8 concurrent: {total:.1f} tok/s in total, one at a time {single:.1f} tok/s, ratio {total / single:.2f} "
        "(goal >= 3.5)"
    )
    return {"single_tok_s": single, "concurrent_8_tok_s": total, "ratio": total / single}


def new_version(settings: Settings, source: int, version: int, factor: float) -> None:
    """A copy of version `source` with its B matrices scaled: a new version of the same shape."""
    files = KernelFiles(settings.layout, KERNEL)
    staged = files.versions_dir / f".v{version}.staging"
    shutil.copytree(files.version_dir(source), staged, ignore=shutil.ignore_patterns("lora.gguf", "KEEP"))
    weights = load_file(str(staged / "adapter_model.safetensors"))
    save_file(
        {k: (v * factor if "lora_B" in k else v).astype(v.dtype) for k, v in weights.items()},
        str(staged / "adapter_model.safetensors"),
    )
    meta = json.loads((staged / "meta.json").read_text())
    (staged / "meta.json").write_text(json.dumps(meta | {"version": version}))
    files.install(staged, version)


def deploys(host: Host, settings: Settings, reps: int) -> dict[str, Any]:
    """Switch `current` to a new version while three clients query; until a query answers from it."""
    files = KernelFiles(settings.layout, KERNEL)
    failures: list[str] = []
    seen: list[int | None] = []
    stop = asyncio.Event()

    new_answer = asyncio.Event()

    async def arrived(version: int) -> None:
        while not seen or seen[-1] != version:
            new_answer.clear()
            await new_answer.wait()

    async def load() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            while not stop.is_set():
                r = await client.post(
                    f"{host.url}/v1/chat/completions", json=host.body(CONCURRENT[2], 8), headers=host.headers
                )
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                else:
                    seen.append(r.json()["engrain_version"])
                new_answer.set()

    async def run() -> list[dict[str, float]]:
        clients = [asyncio.create_task(load()) for _ in range(3)]
        out = []
        version = max(files.versions())
        for i in range(reps):
            version += 1
            await asyncio.to_thread(new_version, settings, 1, version, 0.9 - 0.05 * i)
            started = time.perf_counter()
            with files.locked():
                files.switch(version)
            await arrived(version)
            visible = time.perf_counter() - started
            health = host.health() or {}
            out.append({"visible_s": visible, "load_ms": float(health.get("last_deploy_ms") or 0)})
        stop.set()
        await asyncio.gather(*clients)
        return out

    rounds = asyncio.run(run())
    visible = statistics.median(r["visible_s"] for r in rounds)
    worst = max(r["visible_s"] for r in rounds)
    log(
        f"  deploy: answered by the new version {visible:.2f} s after `current` moved (max {worst:.2f} s; export "
        f"and load {statistics.median(r['load_ms'] for r in rounds):.0f} ms); {len(failures)} failed queries "
        f"of {len(seen) + len(failures)} (goal <= 5 s, none failed)"
    )
    return {
        "visible_s": visible,
        "visible_s_max": worst,
        "rounds": rounds,
        "queries": len(seen) + len(failures),
        "failed_queries": len(failures),
        "failures": failures[:5],
    }


async def query_kernel_p50(settings: Settings, n: int = 10) -> dict[str, Any]:
    async with Client(create_server(settings)) as client:
        latencies, tokens = [], []
        for i in range(n + 1):
            started = time.perf_counter()
            r = await client.call_tool("query_kernel", {"kernel": KERNEL, "prompt": LONG, "max_new_tokens": 40})
            if i:  # the first is a warm-up
                latencies.append(time.perf_counter() - started)
                tokens.append((r.structured_content or {})["completion_tokens"])
    p50 = statistics.median(latencies)
    log(f"  query_kernel through MCP, 40 tokens: p50 {p50:.2f} s (max {max(latencies):.2f} s)")
    return {"p50_s": p50, "max_s": max(latencies), "calls": n, "tokens": statistics.median(tokens)}


SENTENCE = "The old lighthouse stood on the cliff above the harbour, and its lamp turned over the dark water. "


def prompt_of(tokenizer: Any, n: int) -> str:
    """A user message whose formatted prompt is about `n` tokens."""
    words = SENTENCE.split()
    text, i = "", 0
    while len(encode_prompt(tokenizer, text + "Summarise this.")) < n:
        text += words[i % len(words)] + " "
        i += 1
    return text + "Summarise this."


def measure_fast(
    host: Host, raw_base: RawLlama, raw_same: RawLlama, prompts: dict[str, Any], reps: int
) -> dict[str, Any]:
    """Single stream and time to first token against raw llama.cpp, concurrency: one backend's rows."""
    ids, long_prompt, long_ids = prompts["ids"], prompts["long"], prompts["long_ids"]
    served, raw, raw_kind = alternate(
        reps, lambda: host.stream(LONG, TOKENS), lambda: raw_base.run(ids, TOKENS), lambda: raw_same.run(ids, TOKENS)
    )
    rate = statistics.median(s[1] for s in served)
    raw_rate = statistics.median(r[1] for r in raw)
    same_rate = statistics.median(r[1] for r in raw_kind)
    row: dict[str, Any] = {
        "decode_tok_s": rate,
        "raw_llamacpp_base_tok_s": raw_rate,
        "vs_raw_base": rate / raw_rate,
        "raw_llamacpp_same_weights_tok_s": same_rate,
        "vs_raw_same_weights": rate / same_rate,
        "tokens": statistics.median(s[2] for s in served),
    }
    log(
        f"  single stream, kernel with adapter: {rate:.1f} tok/s; raw llama.cpp on the shipped base "
        f"{raw_rate:.1f} tok/s: ratio {rate / raw_rate:.2f} (goal >= 0.8); raw on the same weights "
        f"{same_rate:.1f} tok/s ({rate / same_rate:.2f})"
    )
    ttft, raw_ttft = alternate(reps, lambda: host.stream(long_prompt, 2)[0], lambda: raw_same.run(long_ids, 2)[0])
    row["ttft_200_s"], row["raw_ttft_200_s"] = statistics.median(ttft), statistics.median(raw_ttft)
    row["ttft_prompt_tokens"] = len(long_ids)
    log(
        f"  time to first token, {len(long_ids)}-token prompt: host {row['ttft_200_s']:.2f} s, raw llama.cpp "
        f"{row['raw_ttft_200_s']:.2f} s"
    )
    row["concurrency"] = asyncio.run(concurrency(host, reps))
    ceiling = raw_batched(raw_same.gguf, raw_same.threads, prompts["concurrent_ids"], TOKENS)
    row["concurrency"]["raw_llamacpp"] = ceiling
    log(
        f"  raw llama.cpp, same weights, 8 prompts as one batch vs one at a time: {ceiling['concurrent_8_tok_s']:.1f} "
        f"vs {ceiling['single_tok_s']:.1f} tok/s, ratio {ceiling['ratio']:.2f} (the host reaches "
        f"{row['concurrency']['concurrent_8_tok_s'] / ceiling['concurrent_8_tok_s']:.0%} of its batched rate)"
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="reuse this ENGRAIN_HOME's model and baseline cache")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--gguf-types", default="as-shipped,f16,f32", help="weight types besides the default one, which always runs"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    setup_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="engrain-serve-bench-"))
    settings = Settings(home=work / "home", host_port=0, embedded_services=False, host_controller="none")
    settings.layout.ensure()
    if args.home:  # the dequantised model and the baseline are slow to rebuild: reuse them
        for name in ("models", "cache"):
            if (args.home / name).is_dir():
                shutil.copytree(args.home / name, settings.layout.home / name, dirs_exist_ok=True)
    env = {
        **os.environ,
        "ENGRAIN_HOME": str(settings.layout.home),
        "ENGRAIN_HOST_PORT": "0",
        "ENGRAIN_EMBEDDED_SERVICES": "false",
        "ENGRAIN_HOST_CONTROLLER": "none",
        "HF_HUB_OFFLINE": "1",
        "ENGRAIN_TORCH_THREADS": str(args.threads),
        "ENGRAIN_HOST_THREADS": str(args.threads),
    }
    env.pop("ENGRAIN_BASE_MODEL", None)
    os.environ.update({k: v for k, v in env.items() if k.startswith("ENGRAIN_")})
    model_dir = ensure_base_model(None, settings.layout.models)
    gguf = embedded_gguf_path()
    report: dict[str, Any] = {
        "model": model_dir.name,
        "gguf": gguf.name,
        "threads": args.threads,
        "tokens": TOKENS,
        "reps": args.reps,
        "load_average_at_start": os.getloadavg(),
    }

    report["train_to_deployed"] = anyio.run(train_kernel, settings, env, work)
    facts = json.loads(DATA.read_text())["rounds"][0][:16]
    questions = [p["prompt"] for p in json.loads(PROBES.read_text())]
    adapter = KernelFiles(settings.layout, KERNEL).version_dir(1)
    t0 = time.perf_counter()
    ref = reference(model_dir, adapter, questions + [f["prompt"] for f in facts])
    log(f"fp32 reference answers: {len(ref)} in {time.perf_counter() - t0:.0f} s")
    _, tok = load_base(model_dir)
    ids = encode_prompt(tok, LONG)
    long_prompt = prompt_of(tok, 200)
    long_ids = encode_prompt(tok, long_prompt)
    raw_base = RawLlama(gguf, args.threads)

    concurrent_ids = [encode_prompt(tok, p) for p in CONCURRENT]
    prompts = {"ids": ids, "long": long_prompt, "long_ids": long_ids, "concurrent_ids": concurrent_ids}
    rows: dict[str, Any] = {}
    default_type = Settings().host_gguf_type  # what a host serves by default: its rows are the headline figures
    kinds = [default_type, *(k for k in args.gguf_types.split(",") if k != default_type)]
    for kind in kinds:
        log(f"llama.cpp backend, weights {kind}:")
        host_env = env | {"ENGRAIN_HOST_BACKEND": "llama.cpp", "ENGRAIN_HOST_GGUF_TYPE": kind}
        host = Host(settings, host_env, work / f"host-{kind}.log")
        try:
            converted = list(settings.layout.models.glob(f"*-{kind.upper()}.gguf"))
            raw_same = raw_base if kind == "as-shipped" else RawLlama(converted[0], args.threads)
            row = measure_fast(host, raw_base, raw_same, prompts, args.reps)
            row["agreement"] = agreement(host, questions, facts, ref)
            if kind == default_type:
                row["deploy"] = deploys(host, settings, args.reps)
                row["query_kernel"] = anyio.run(query_kernel_p50, settings)
                with KernelFiles(settings.layout, KERNEL).locked():
                    KernelFiles(settings.layout, KERNEL).switch(1)
        finally:
            host.stop()
        rows[kind] = row

    log("transformers backend (fp32 reference):")
    host = Host(settings, env | {"ENGRAIN_HOST_BACKEND": "transformers"}, work / "host-transformers.log")
    try:
        served, raw = alternate(args.reps, lambda: host.stream(LONG, TOKENS), lambda: raw_base.run(ids, TOKENS))
        rate, raw_rate = statistics.median(s[1] for s in served), statistics.median(r[1] for r in raw)
        rows["transformers"] = {
            "decode_tok_s": rate,
            "raw_llamacpp_base_tok_s": raw_rate,
            "vs_raw_base": rate / raw_rate,
        }
        log(
            f"  single stream, kernel with adapter: {rate:.1f} tok/s; raw llama.cpp {raw_rate:.1f}: "
            f"{rate / raw_rate:.2f}"
        )
    finally:
        host.stop()

    default = rows[default_type]
    report = {
        "fast_vs_llamacpp": default["vs_raw_base"],
        "concurrency_8_vs_1": default["concurrency"]["ratio"],
        "greedy_agreement": default["agreement"]["identical"],
        "deploy_s": default.get("deploy", {}).get("visible_s"),
        **report,
        "backends": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.out} (logs in {work})")


if __name__ == "__main__":
    main()
