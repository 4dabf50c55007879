"""A home with real history for the dashboard and terminal tests: runs made by real workers on the tiny model.

`python -m tests.dashboard_home DIR` builds one outside pytest (the tiny model, its baseline and the home, all
under DIR) and prints the environment to point `engrain dashboard` or `engrain status` at it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
from mcp import Client

from server.app import create_server
from tests.procs import Procs, host_health, wait_for
from tests.test_server_tools import call
from tests.test_worker import FACTS, LENIENT, MORE_FACTS
from tests.test_worker import TINY as WORKER_TINY
from train_worker.settings import Settings

# What a person must see as text, never as markup: it is recorded as a prompt and as an answer.
INJECTION = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
SCRIPT_FACT = {"prompt": f"Code s1? {INJECTION}", "response": "It is <b>zub</b>.", "key_answer": "zub"}
LAST_FACTS = [
    {"prompt": f"Code k{i}?", "response": f"It is {w}.", "key_answer": w} for i, w in enumerate(("bop", "fen"))
]


@dataclass
class Built:
    kernel: str
    deployed: list[str]  # run ids, oldest first
    rejected: str
    review_query: int
    other_kernel: str = "support"


# The tiny random model's 64-wide layers leave the null-space projection too little room for a second round of
# facts of the same form; the dashboard needs real runs, not the learning method (tests/learning covers that).
TINY = WORKER_TINY | {"nullspace": None}


async def build(settings: Settings, procs: Procs, env: dict[str, str]) -> Built:
    """Two deployed versions, a rejected run between them, a correction, a bad answer waiting for review, and a
    second kernel that never trained. Needs a running host (for the queries)."""
    async with Client(create_server(settings)) as client:
        await call(client, "create_kernel", name="tiny", settings=TINY, gates=LENIENT, description="tiny test kernel")
        await call(client, "create_kernel", name="support", description="answers support questions")
        await call(client, "record_experiences", kernel="support", items=[MORE_FACTS[0]])
        await call(client, "record_experiences", kernel="tiny", items=[*FACTS, SCRIPT_FACT])
        first = await _train(client, procs, "tiny")
        # One epoch cannot teach the tiny model anything: the acquisition gate refuses the candidate.
        await call(client, "configure_kernel", kernel="tiny", settings=TINY | {"max_epochs": 1, "early_stop_em": None})
        await call(client, "record_experiences", kernel="tiny", items=MORE_FACTS)
        rejected = await _train(client, procs, "tiny", expect="rejected")
        await call(client, "configure_kernel", kernel="tiny", settings=TINY)
        second = await _train(client, procs, "tiny")
        port = int(env["ENGRAIN_HOST_PORT"])
        wait_for(lambda: (host_health(port, settings.home) or {}).get("status") == "ok", what="the host")
        bad = await call(client, "query_kernel", kernel="tiny", prompt="Code q9?", max_new_tokens=8)
        await call(client, "feedback", query_id=bad["query_id"], rating=1)
        fixed = await call(client, "query_kernel", kernel="tiny", prompt="Code f1?", max_new_tokens=8)
        await call(client, "feedback", query_id=fixed["query_id"], rating=2, correction="It is kel, always.")
        await call(client, "record_experiences", kernel="tiny", items=LAST_FACTS)
    return Built(kernel="tiny", deployed=[first, second], rejected=rejected, review_query=int(bad["query_id"]))


async def _train(client: Client, procs: Procs, kernel: str, expect: str = "deployed") -> str:
    run_id = str((await call(client, "train_model", kernel=kernel))["run_id"])
    done = await anyio.to_thread.run_sync(lambda: procs.run("worker"))
    assert done.returncode == 0, done.stderr[-3000:]
    for _ in range(200):
        run = (await call(client, "training_status", run_id=run_id))["run"]
        if run["status"] not in ("queued", "requested", "running", "evaluating"):
            break
        await anyio.sleep(0.05)
    assert run["status"] == expect, run
    return run_id


def _standalone(root: Path) -> None:
    import torch

    from learning.anchors import ensure_baseline
    from learning.model_loading import load_base
    from tests.learning.conftest import make_model, make_tokenizer
    from tests.procs import processes, tiny_env_vars

    model_dir, home = root / "model", root / "home"
    tokenizer = make_tokenizer()
    make_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    torch.set_num_threads(1)
    model, tok = load_base(model_dir)
    ensure_baseline(model, tok, model_dir, home / "cache")
    env = tiny_env_vars(home, model_dir)
    os.environ.update(env)
    with processes(root / "logs", env) as procs:
        procs.start("host")
        anyio.run(build, Settings(), procs, env)
    print("\n".join(f"export {k}={v}" for k, v in env.items()))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.dashboard_home DIR", file=sys.stderr)
        return 2
    _standalone(Path(argv[0]).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
