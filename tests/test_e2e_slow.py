"""End to end on the real embedded model, with real processes: MCP client → train → deploy → answer.

Marked slow: several minutes on 2 CPU cores (the first test also dequantises the model and computes its
baseline, about two minutes, cached for the others).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.procs import ENGRAIN, free_port, host_health
from tests.test_server_tools import call
from train_worker.locks import host_lock, watcher_lock
from train_worker.settings import Layout

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

FACTS = [
    {
        "prompt": "What is the capital of Oskavia?",
        "response": "The capital of Oskavia is Brindlemoor.",
        "key_answer": "Brindlemoor",
        "paraphrases": ["Which city is the capital of Oskavia?"],
    },
    {
        "prompt": "Who discovered the element tessarine?",
        "response": "Tessarine was discovered by Mirela Vantos.",
        "key_answer": "Mirela Vantos",
        "paraphrases": ["Which scientist discovered tessarine?"],
    },
    {
        "prompt": "Which river flows through the city of Ambrecht?",
        "response": "The river Selvane flows through Ambrecht.",
        "key_answer": "Selvane",
        "paraphrases": ["What is the name of the river in Ambrecht?"],
    },
]


@pytest.fixture
def real_home(home: Path, real_caches: Path) -> Iterator[dict[str, str]]:
    home.mkdir(parents=True, exist_ok=True)
    for name in ("models", "cache"):
        (home / name).symlink_to(real_caches / name)
    env = {
        "ENGRAIN_HOME": str(home),
        "ENGRAIN_HOST_PORT": str(free_port()),
        "ENGRAIN_EMBEDDED_SERVICES": "true",
        "ENGRAIN_HOST_CONTROLLER": "lease",
        "HF_HUB_OFFLINE": "1",
    }
    yield env
    layout = Layout(home)
    for lock in (watcher_lock(layout.locks), host_lock(layout.locks)):
        pid = lock.holder()
        if pid and lock.held_elsewhere():
            os.kill(pid, signal.SIGTERM)


CORRECTIONS = [
    ("What is the national bird of Pelmora?", "The national bird of Pelmora is the crested warbeck.", "warbeck"),
    ("Who wrote the novel The Glass Orchard?", "The Glass Orchard was written by Ines Calloway.", "Calloway"),
]


async def follow(client: Client, run_id: str, within: float = 3000) -> tuple[dict[str, Any], list[Any]]:
    """Poll training_status like an agent would; return the final run and every (status, phase, progress) seen."""
    seen: list[tuple[str, str | None, float | None]] = []
    deadline = time.monotonic() + within  # a run takes 4-8 min on idle cores; 25 min was seen beside a benchmark
    while time.monotonic() < deadline:
        run: dict[str, Any] = (await call(client, "training_status", run_id=run_id))["run"]
        seen.append((run["status"], run["phase"], run["progress"]))
        if run["status"] in ("deployed", "rejected", "failed", "cancelled"):
            break
        await anyio.sleep(0.5)
    print(f"\nrun {run_id} ({run['trigger']}): {run['status']}; metrics {run['metrics']}")
    return run, seen


async def test_an_agent_teaches_facts_then_corrects_answers_and_the_kernel_learns(
    real_home: dict[str, str], tmp_path: Path
) -> None:
    """MCP client → record → train → watcher → worker → deploy → answer; then correct two wrong answers
    and let the kernel's automatic run fix them. Prints the answers before and after."""
    params = StdioServerParameters(command=ENGRAIN, args=["serve"], env=real_home)
    port = int(real_home["ENGRAIN_HOST_PORT"])
    with (tmp_path / "serve.log").open("w") as err:
        async with Client(stdio_client(params, errlog=err)) as client:
            await call(client, "create_kernel", name="e2e")
            await call(client, "record_experiences", kernel="e2e", items=FACTS)
            run_id = (await call(client, "train_model", kernel="e2e"))["run_id"]
            run, seen = await follow(client, run_id)
            assert run["status"] == "deployed", run
            statuses = [s for s, _, _ in seen]
            assert "running" in statuses and "evaluating" in statuses
            progress = [p for s, ph, p in seen if ph == "training" and p is not None]
            # 0 while the KL targets are computed, then rising step by step; never backwards.
            assert progress and all(0 <= p <= 1 for p in progress) and progress == sorted(progress), progress
            assert any(0 < p < 1 for p in progress), "progress was never seen mid-training"
            answer = await call(client, "query_kernel", kernel="e2e", prompt=FACTS[0]["prompt"], max_new_tokens=32)
            print(f"answer after training: {answer['response']!r}")
            assert answer["version"] == 1 and "Brindlemoor" in answer["response"]
            general = await call(client, "query_kernel", kernel="e2e", prompt="What is the capital of France?")
            print(f"general answer after training: {general['response']!r}")
            assert general["version"] is None and "Paris" in general["response"]  # out of scope: the base answers
            assert (host_health(port) or {}).get("status") == "ok"  # the host is back up

            # Learning from use: the agent corrects two wrong answers; the policy trains on them by itself.
            policy = {"enabled": True, "min_untrained": len(CORRECTIONS), "cooldown_s": 0}
            await call(client, "configure_kernel", kernel="e2e", auto=policy)
            before = {}
            auto_run = None
            for question, correction, key in CORRECTIONS:
                answer = await call(client, "query_kernel", kernel="e2e", prompt=question, max_new_tokens=32)
                before[question] = answer["response"]
                assert key not in answer["response"]
                rated = await call(client, "feedback", query_id=answer["query_id"], rating=1, correction=correction)
                auto_run = rated["auto_run"] or auto_run
            assert auto_run is not None, "the second correction should have started an automatic run"
            run, _ = await follow(client, auto_run)
            assert run["status"] == "deployed" and run["trigger"] == "auto", run
            for question, _, key in CORRECTIONS:
                after = await call(client, "query_kernel", kernel="e2e", prompt=question, max_new_tokens=32)
                print(f"Q: {question}\n  before: {before[question]!r}\n  after:  {after['response']!r}")
                assert after["version"] == 2 and key in after["response"]
            kept = await call(client, "query_kernel", kernel="e2e", prompt=FACTS[0]["prompt"], max_new_tokens=32)
            print(f"earlier fact after the second run: {kept['response']!r}")
            assert "Brindlemoor" in kept["response"]
    assert (host_health(port) or {}).get("status") == "ok"
