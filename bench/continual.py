"""Continual-learning benchmark on the real embedded model, through the product's own path.

Each strategy (a set of training settings) teaches a kernel the rounds of `bench/data/continual.json`
one after another, exactly as a user's agent would: the facts are recorded in a real store, the
server's `Dispatcher` writes the request (every earlier fact goes with it), the `Worker` picks the
replay set, trains, evaluates against the default gates and deploys or rejects, and `Pickup` records
the result (a rejected round's facts stay untrained and go with the next round). Nothing here
trains or scores on its own: the per-round figures come from each run's `eval_report.json`.

Measures, per round (every round shares question forms with earlier ones, and with facts the base
model knows):
- `acquisition_em`: key-answer exact match on the round's trained questions;
- `held_back_kept`: of the earlier facts the replaced version answered right and this run did not
  replay, the share still right (`retention_kept` is the same over all earlier facts);
- `general_kept`: of the probes the base answers right (150+, never trained on), the share kept;
- `ppl_ratio`: reference-text perplexity over the base's; `must_keep_lost`: canaries lost;
- `paraphrase_em`: after the round, exact match on the other wordings of every fact taught so far
  (measured on the deployed version by this script, as the host serves it);
- `general_kept`, `ppl_ratio` and the gates see what the host serves: with `serve_scope="taught"` (the
  default) the base answers what names nothing taught. `routing` counts the items that went the
  unexpected way, and `adapter_general_kept` / `adapter_ppl_ratio` (measured here) are the same
  version's adapter answering every prompt, the drift that scoping keeps from users;
- `train_to_deployed_s`: from the request to the recorded result.

    .venv/bin/python -m bench.continual                                  # every strategy, 5 rounds, 3 seeds
    .venv/bin/python -m bench.continual --strategies default --rounds 2 --seeds 0   # a quick screen
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from learning import lora
from learning.config import TrainSettings
from learning.examples import Example
from learning.metrics import answer_items, measure_general
from learning.pipeline import Bundle, load_bundle
from learning.reports import Metrics
from learning.scope import read_scope
from server.dispatch import Dispatcher
from server.kernel_config import KernelConfig
from server.pickup import Pickup
from store import Store
from store.models import NewExperience
from train_worker.host_control import NoHost
from train_worker.settings import Settings
from train_worker.worker import Worker

log = logging.getLogger("bench.continual")

DATA = Path(__file__).parent / "data" / "continual.json"
RESULTS = Path(__file__).parent / "results" / "continual.json"
KERNEL = "bench"

# Overrides of TrainSettings() per strategy. "default" is TrainSettings() itself; the others each
# change one thing, so every row says what one lever does (or, with a suffix, one more on top of a row).
PREVIOUS_DEFAULT: dict[str, Any] = {  # what shipped before this benchmark: one adapter trained further each run
    "adapter_mode": "continue",
    "nullspace": None,
    "replay_strategy": "uniform",
    "replay_ratio": 1.0,
    "learning_rate": 1e-3,
    "rehearse_must_keep": False,
}
PROTECTION_OFF: dict[str, Any] = {
    **PREVIOUS_DEFAULT,
    "replay_ratio": 0.0,
    "anchor_ratio": 0.0,
    "anchor_neighbour_share": 0.0,
    "neighbour_anchors": False,
    "kl_weight": 0.0,
    "ewc_lambda": 0.0,
}
# Every strategy but the default was measured with its adapter answering every prompt, before versions had a
# scope: each row says what its lever does to the adapter itself. "unscoped" is today's training without
# the scope, which is where the drift the scope keeps from users comes from.
UNSCOPED: dict[str, Any] = {"serve_scope": "all"}
_LEVERS: dict[str, dict[str, Any]] = {
    "naive": PROTECTION_OFF,
    "previous_default": PREVIOUS_DEFAULT,
    "previous_default_nearest_replay": {**PREVIOUS_DEFAULT, "replay_strategy": "nearest"},
    "grow_no_projection": {"nullspace": None},
    "nearest_anchors_protected": {"nullspace": {"nearest_anchors": 2}},
    "nullspace_general_only": {"nullspace": {"facts": False}},
    "nullspace_no_anchors": {"anchor_ratio": 0.0, "neighbour_anchors": False, "kl_weight": 0.0},
    "mid_layers": {"adapter": {"layers": list(range(6, 24))}},
    "bottom_two_thirds": {"adapter": {"layers": list(range(20))}},
    "self_distilled": {"self_distilled_targets": True},
    "no_must_keep_rehearsal": {"rehearse_must_keep": False},
    "tighter_nullspace": {"nullspace": {"general_threshold": 0.2}},
    "more_anchors": {"anchor_ratio": 2.0},
    "down_proj_only": {"adapter": {"target_modules": ["down_proj"]}},
    "down_proj_only_lr_1e-2": {"adapter": {"target_modules": ["down_proj"]}, "learning_rate": 1e-2},
    "unscoped": {},
}
STRATEGIES: dict[str, dict[str, Any]] = {name: {**UNSCOPED, **lever} for name, lever in _LEVERS.items()} | {
    "default": {}
}


def strategy_settings(name: str, extra: dict[str, Any]) -> TrainSettings:
    """TrainSettings() with the strategy's overrides (nested dicts merge) and any extra overrides on top."""
    data = TrainSettings().model_dump()
    for patch in (STRATEGIES[name], extra):
        for key, value in patch.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
    return TrainSettings.model_validate(data)


def load_rounds(path: Path = DATA) -> list[list[Example]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    fields = set(Example.model_fields)
    return [[Example.model_validate({k: v for k, v in f.items() if k in fields}) for f in r] for r in data["rounds"]]


def paraphrase_em(bundle: Bundle, version_dir: Path | None, facts: Sequence[Example]) -> float:
    """Exact match on the paraphrases of `facts` as a deployed version serves them (the bare base when None)."""
    items = [("paraphrase", p, e) for e in facts for p in e.paraphrases]
    if version_dir is None:
        scores = answer_items(bundle.model, bundle.tokenizer, items)
    else:
        model = lora.attach_saved(bundle.model, version_dir, trainable=False)
        try:
            scores = answer_items(model, bundle.tokenizer, items, scope=read_scope(version_dir))
        finally:
            bundle.model = model.unload()
    return sum(s.em for s in scores) / len(scores)


def adapter_general(bundle: Bundle, version_dir: Path | None) -> tuple[float | None, float | None]:
    """General probes kept and perplexity ratio of a version's adapter answering every prompt (no scope)."""
    if version_dir is None:
        return None, None
    model = lora.attach_saved(bundle.model, version_dir, trainable=False)
    try:
        m = Metrics()
        measure_general(model, bundle.tokenizer, bundle.baseline, m)
    finally:
        bundle.model = model.unload()
    return m.general_kept, m.ppl_ratio


async def _quiet(*_: Any) -> None:
    return None


async def run_session(
    bundle: Bundle, shared: Path, settings: TrainSettings, rounds: list[list[Example]], work: Path
) -> list[dict[str, Any]]:
    """Teach the rounds to a fresh kernel through store, dispatcher, worker and pickup; one row per round."""
    home = work / "home"
    home.mkdir(parents=True)
    for name in ("models", "cache"):  # the dequantised model and the base's baseline are made once
        (home / name).symlink_to(shared / name, target_is_directory=True)
    env = Settings(home=home, host_controller="none", embedded_services=False)
    env.layout.ensure()
    store = await Store.open(env.layout.db)
    rows: list[dict[str, Any]] = []
    try:
        config = KernelConfig(train=settings)
        await store.kernels.create(KERNEL, "embedded", "continual benchmark", config.stored())
        dispatcher = Dispatcher(store, env.layout)
        pickup = Pickup(store, env.layout, dispatcher, _quiet)
        taught: list[Example] = []
        for number, facts in enumerate(rounds, start=1):
            await store.experiences.add_many(KERNEL, [_experience(e) for e in facts])
            started = time.perf_counter()
            run, _ = await dispatcher.request(KERNEL)
            code = Worker(env, NoHost()).run()  # in the main thread: the worker installs signal handlers
            await pickup.sweep()
            seconds = time.perf_counter() - started
            run = await store.runs.get(run.id)
            taught += facts
            report = json.loads((env.layout.run_dir(run.id) / "eval_report.json").read_text())
            m = report["metrics"]
            kernel = await store.kernels.get(KERNEL)
            deployed = kernel.deployed_version
            version_dir = env.layout.kernel_dir(KERNEL) / "versions" / f"v{deployed}" if deployed else None
            row = {
                "round": number,
                "status": run.status,
                "worker_exit": code,
                "version": deployed,
                "n_new": run.n_new,
                "n_earlier": run.n_replay,
                "replayed": len(report["outcome"]["replayed"]) if report.get("outcome") else None,
                **{
                    k: m.get(k)
                    for k in (
                        "acquisition_em",
                        "retention_kept",
                        "held_back_kept",
                        "earlier_known",
                        "earlier_lost",
                        "must_keep_lost",
                        "general_kept",
                        "anchor_agreement",
                        "ppl_ratio",
                    )
                },
                "routing": m.get("routing"),
                **dict(
                    zip(
                        ("adapter_general_kept", "adapter_ppl_ratio"), adapter_general(bundle, version_dir), strict=True
                    )
                ),
                "new_paraphrase_em": m.get("paraphrase_em"),
                "paraphrase_em": paraphrase_em(bundle, version_dir, taught),
                "failed_gates": [g["name"] for g in report["gates"]["gates"] if g["status"] == "failed"],
                "lost": [_describe(x) for x in m.get("lost", [])],
                "lost_probes": m.get("lost_probes", []),
                "epochs": report["outcome"]["epochs"] if report.get("outcome") else None,
                "train_seconds": round(report["outcome"]["train_seconds"], 1) if report.get("outcome") else None,
                "eval_seconds": round(m["seconds"], 1),
                "train_to_deployed_s": round(seconds, 1),
            }
            rows.append(row)
            log.info("round %d: %s", number, {k: v for k, v in row.items() if k not in ("lost", "lost_probes")})
    finally:
        await store.close()
    return rows


def _experience(e: Example) -> NewExperience:
    return NewExperience(prompt=e.prompt, response=e.response, key_answer=e.key_answer, paraphrases=e.paraphrases)


def _describe(item: dict[str, Any]) -> str:
    by = item.get("overwritten_by")
    line = f"{item['prompt']} -> {item['answer'][:60]} (expected {item['expected']})"
    return line + (f" [overwritten by {by['prompt']}]" if by else "")


def summarise(seeds: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per round, the mean over seeds; the summary is the worst round of those means, `_worst` the worst seed."""
    runs = list(seeds.values())
    n_rounds = len(runs[0])

    def per_round(key: str) -> list[list[float]]:
        return [[r[i][key] for r in runs if r[i].get(key) is not None] for i in range(n_rounds)]

    def worst(key: str, high_is_bad: bool = False) -> tuple[float | None, float | None]:
        rounds = [values for values in per_round(key) if values]
        if not rounds:
            return None, None
        means = [statistics.fmean(v) for v in rounds]
        flat = [x for v in rounds for x in v]
        pick = max if high_is_bad else min
        return round(pick(means), 4), round(pick(flat), 4)

    out: dict[str, Any] = {}
    for key, name, bad_high in (
        ("acquisition_em", "min_trained_em", False),
        ("held_back_kept", "held_back_kept", False),
        ("retention_kept", "retention_kept", False),
        ("general_kept", "general_kept", False),
        ("ppl_ratio", "ppl_ratio", True),
        ("must_keep_lost", "must_keep_lost", True),
        ("adapter_general_kept", "adapter_general_kept", False),  # unscoped, measured by this script
        ("adapter_ppl_ratio", "adapter_ppl_ratio", True),
    ):
        out[name], out[f"{name}_worst"] = worst(key, bad_high)
    finals = [r[-1]["paraphrase_em"] for r in runs]
    out["final_paraphrase_em"] = round(statistics.fmean(finals), 4)
    out["final_paraphrase_em_worst"] = round(min(finals), 4)
    deployed = [sum(row["status"] == "deployed" for row in r) for r in runs]
    out["deployed_rounds"] = statistics.fmean(deployed)
    out["deployed_rounds_worst"] = min(deployed)
    times = [row["train_to_deployed_s"] for r in runs for row in r if row["status"] == "deployed"]
    out["train_to_deployed_s"] = round(statistics.fmean(times), 1) if times else None
    out["train_to_deployed_s_worst"] = max(times) if times else None
    out["rounds"] = n_rounds
    out["seeds"] = len(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated names")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--home", type=Path, default=Settings().home, help="the shared model and baseline caches")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--settings", default="{}", help="JSON overrides applied on top of every strategy")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "transformers", "peft", "learning", "train_worker", "server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    shared = args.home
    bundle = load_bundle(None, shared / "models", shared / "cache")
    rounds = load_rounds(args.data)[: args.rounds]
    extra = json.loads(args.settings)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for name in args.strategies.split(","):
        settings = strategy_settings(name, extra)
        by_seed = _earlier_seeds(results.get(name), settings, len(rounds))
        for seed in [int(s) for s in args.seeds.split(",")]:
            work = Path(tempfile.mkdtemp(prefix=f"engrain-continual-{name}-"))
            try:
                seeded = settings.model_copy(update={"seed": seed})
                by_seed[seed] = anyio.run(run_session, bundle, shared, seeded, rounds, work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            # Written after every seed, so a long benchmark cut short keeps what it measured.
            results[name] = {
                **summarise(by_seed),
                "settings": settings.model_dump(mode="json"),
                "per_seed": {str(k): v for k, v in by_seed.items()},
            }
            results["meta"] = _meta(bundle)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
        print_result(name, results[name])


def _earlier_seeds(entry: dict[str, Any] | None, settings: TrainSettings, rounds: int) -> dict[int, list[Any]]:
    """Seeds already measured with these very settings and rounds: a run of more seeds adds to them."""
    if not entry or entry.get("rounds") != rounds:
        return {}
    if entry.get("settings", {}) | {"seed": 0} != settings.model_dump(mode="json") | {"seed": 0}:
        return {}
    return {int(k): v for k, v in entry.get("per_seed", {}).items()}


def print_result(name: str, result: dict[str, Any]) -> None:
    """Human-readable summary of one strategy."""
    keys = ("min_trained_em", "held_back_kept", "final_paraphrase_em", "general_kept", "ppl_ratio", "deployed_rounds")
    print(f"\n== {name} ==  " + "  ".join(f"{k} {result[k]} (worst {result.get(k + '_worst')})" for k in keys))
    for seed, rows in result["per_seed"].items():
        for r in rows:
            print(
                f"  seed {seed} round {r['round']}: {r['status']:9} acq {r['acquisition_em']:.2f}  held-back kept "
                f"{_f(r['held_back_kept'])}  paraphrase {r['paraphrase_em']:.2f}  general {_f(r['general_kept'])}  "
                f"ppl {_f(r['ppl_ratio'])}  {r['train_to_deployed_s']} s  {','.join(r['failed_gates'])}"
            )


def _f(value: float | None) -> str:
    return "  -  " if value is None else f"{value:.3f}"


def _meta(bundle: Bundle) -> dict[str, Any]:
    return {
        "model": bundle.model_dir.name,
        "threads": os.cpu_count(),
        "probes_base_right": sum(bundle.baseline.probe_correct),
        "canaries_base_right": sum(c.correct for c in bundle.baseline.canaries),
        "base_ppl": bundle.baseline.reference_ppl,
    }


if __name__ == "__main__":
    main()
