"""Two rounds of facts of the same forms, taught through MCP to the real model by real processes.

Round 2 asks the same questions about other subjects ("the capital of <another made-up country>"),
which on the previous learning method overwrote round 1 (its retention gate refused round 2 and the
kernel stopped learning). Both rounds must deploy, and the round-1 facts that round 2 did not replay
must still be answered. Marked slow: two real training runs, several minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.procs import ENGRAIN
from tests.test_e2e_slow import follow, real_home  # noqa: F401  (a fixture)
from tests.test_server_tools import call

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

ROUNDS = Path(__file__).parents[1] / "bench" / "data" / "continual.json"
PER_ROUND = 8  # the first 8 facts of a round: two capitals, two inventors, two made-up words, a novel, a currency


def round_items(number: int) -> list[dict[str, Any]]:
    facts = json.loads(ROUNDS.read_text())["rounds"][number][:PER_ROUND]
    return [{k: f[k] for k in ("prompt", "response", "key_answer", "paraphrases")} for f in facts]


async def test_a_second_round_of_the_same_forms_deploys_and_keeps_the_first(
    real_home: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> None:
    # Served at f32, the answers are the ones the gates judged (the shipped Q4_1 file can differ in a word).
    params = StdioServerParameters(command=ENGRAIN, args=["serve"], env=real_home | {"ENGRAIN_HOST_GGUF_TYPE": "f32"})
    with (tmp_path / "serve.log").open("w") as err:
        async with Client(stdio_client(params, errlog=err)) as client:
            await call(client, "create_kernel", name="session")
            runs = []
            for number in (0, 1):
                await call(client, "record_experiences", kernel="session", items=round_items(number))
                run_id = (await call(client, "train_model", kernel="session"))["run_id"]
                run, _ = await follow(client, run_id)
                print(
                    f"round {number + 1}: gates {[(g['name'], g['value']) for g in run['gates']]}, lost {run['lost']}"
                )
                assert run["status"] == "deployed", run["error"]
                runs.append(run)
            metrics = runs[1]["metrics"]
            # What v1 answered right is what v2 must keep (a fact v1 never learnt does not count); round 2
            # replayed only some of it, and lost none.
            known = round(runs[0]["metrics"]["acquisition_em"] * PER_ROUND)
            assert known >= PER_ROUND - 1 and metrics["earlier_known"] == known
            assert metrics["held_back_kept"] == 1.0 and metrics["retention_kept"] == 1.0
            assert runs[1]["lost"] == []
            right = 0
            for fact in round_items(0):
                answer = await call(client, "query_kernel", kernel="session", prompt=fact["prompt"], max_new_tokens=24)
                right += fact["key_answer"] in answer["response"]
            assert answer["version"] == 2
            assert right >= known, f"v2 answers {right} of the {known} round-1 facts v1 knew"
