"""Continual-learning benchmark on the real embedded model: rounds of made-up facts, trained one after another.

Each strategy trains round 1, then round 2 on top of round 1's adapter (with round 1 as the replay
pool), and so on, exactly as the worker chains versions. After every round it measures the accuracy
matrix R[i][j] (key-answer exact match on round j's trained questions after training round i),
paraphrase accuracy on the rounds trained so far, and general drift against the base model
(probes the base got right that are still right, anchor agreement, reference perplexity ratio).

Forgetting follows Avalanche / Chaudhry et al. (2018): for each earlier round, the best accuracy it
ever had minus its final accuracy, averaged. BWT follows GEM (Lopez-Paz & Ranzato, 2017):
mean over earlier rounds j of R[T][j] - R[j][j].

    .venv/bin/python -m bench.continual                      # every strategy, three rounds
    .venv/bin/python -m bench.continual --strategies default --rounds 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from learning.config import GateThresholds, TrainSettings
from learning.examples import Example
from learning.metrics import answer_items
from learning.pipeline import Bundle, evaluate_candidate, load_bundle, release, run_training, save_version

log = logging.getLogger("bench.continual")

DATA = Path(__file__).parent / "data" / "facts.json"
RESULTS = Path(__file__).parent / "results" / "continual.json"

# Overrides of TrainSettings() per strategy; everything else (adapter, lr, epochs, early stopping) is the
# default's, so each row adds one lever. "default" is TrainSettings() itself.
PROTECTION_OFF: dict[str, Any] = {
    "replay_ratio": 0.0,
    "anchor_ratio": 0.0,
    "anchor_neighbour_share": 0.0,
    "kl_weight": 0.0,
    "ewc_lambda": 0.0,
}
REPLAY_ANCHORS: dict[str, Any] = {**PROTECTION_OFF, "replay_ratio": 1.0, "anchor_ratio": 1.0}
STRATEGIES: dict[str, dict[str, Any]] = {
    "naive": PROTECTION_OFF,
    "replay": {**PROTECTION_OFF, "replay_ratio": 1.0},
    "replay_anchors": REPLAY_ANCHORS,
    "replay_anchors_ewc": {**REPLAY_ANCHORS, "ewc_lambda": 0.05},
    "replay_anchors_kl": {**REPLAY_ANCHORS, "kl_weight": 1.0},
    "default": {},
}


def default_home() -> Path:
    """`$ENGRAIN_HOME`, else the product default."""
    env = os.environ.get("ENGRAIN_HOME")
    return Path(env) if env else Path.home() / ".local" / "share" / "engrain"


def load_rounds(path: Path = DATA) -> list[list[Example]]:
    """The benchmark's rounds of facts."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return [[Example.model_validate(f) for f in r] for r in data["rounds"]]


def em(bundle: Bundle, model: Any, facts: list[Example], paraphrases: bool = False) -> float:
    """Key-answer exact match on the facts' trained questions, or on their paraphrases."""
    triples = (
        [("p", p, e) for e in facts for p in e.paraphrases] if paraphrases else [("t", e.prompt, e) for e in facts]
    )
    scores = answer_items(model, bundle.tokenizer, triples)
    return sum(s.em for s in scores) / len(scores)


def general(bundle: Bundle, model: Any) -> dict[str, Any]:
    """Drift against the base model: kept probes, anchor agreement, perplexity ratio."""
    report = evaluate_candidate(bundle, model, [], [], GateThresholds())
    m = report.metrics
    assert m.general_kept is not None and m.ppl_ratio is not None
    return {
        "general_kept": m.general_kept,
        "ppl_ratio": m.ppl_ratio,
        "anchor_agreement": m.anchor_agreement or 0.0,
        "probe_accuracy": m.probe_accuracy or 0.0,
        "lost_probes": m.lost_probes,
    }


def summarise(matrix: list[list[float]]) -> dict[str, float]:
    """Average accuracy, forgetting (Avalanche) and BWT (GEM) of a T x T accuracy matrix."""
    t = len(matrix)
    final = matrix[-1]
    out = {"average_accuracy": sum(final) / t, "min_trained_em": min(final)}
    if t > 1:
        out["forgetting"] = sum(max(matrix[i][j] for i in range(j, t - 1)) - final[j] for j in range(t - 1)) / (t - 1)
        out["bwt"] = sum(final[j] - matrix[j][j] for j in range(t - 1)) / (t - 1)
    else:
        out["forgetting"] = 0.0
        out["bwt"] = 0.0
    return out


def run_strategy(
    bundle: Bundle, name: str, settings: TrainSettings, rounds: list[list[Example]], work: Path
) -> dict[str, Any]:
    """Train the rounds in sequence with one strategy and measure everything after each round."""
    started = time.perf_counter()
    matrix: list[list[float]] = []
    per_round: list[dict[str, Any]] = []
    previous: Path | None = None
    losses: dict[str, float] = {}
    train_seconds = 0.0
    for i, new in enumerate(rounds):
        pool = [e.model_copy(update={"loss": losses.get(e.id)}) for r in rounds[:i] for e in r]
        t0 = time.perf_counter()
        candidate = run_training(bundle, new, pool, settings, previous_version=previous)
        train_seconds += time.perf_counter() - t0
        losses.update(candidate.outcome.example_losses)
        row = [em(bundle, candidate.model, r) for r in rounds]
        seen = [e for r in rounds[: i + 1] for e in r]
        drift = general(bundle, candidate.model)
        para = em(bundle, candidate.model, seen, paraphrases=True)
        version = work / name / f"v{i + 1}"
        save_version(candidate, None, version)
        release(bundle, candidate)
        previous = version
        matrix.append(row)
        per_round.append(
            {
                "round": i + 1,
                "accuracy": row,
                "paraphrase_em": para,
                **drift,
                "stopped": candidate.outcome.stopped,
                "epochs": candidate.outcome.epochs,
                "steps": candidate.outcome.steps,
                "tokens_per_s": round(candidate.outcome.tokens_per_s, 1),
                "train_seconds": round(candidate.outcome.train_seconds, 1),
            }
        )
        log.info("%s round %d: R=%s paraphrase=%.3f %s", name, i + 1, [round(x, 3) for x in row], para, drift)
    trained = [row[: len(matrix)] for row in matrix]
    summary = summarise(trained)
    last = per_round[-1]
    summary.update(
        {
            "final_paraphrase_em": last["paraphrase_em"],
            "general_kept": last["general_kept"],
            "ppl_ratio": last["ppl_ratio"],
            "anchor_agreement": last["anchor_agreement"],
        }
    )
    # The summary keys sit at the top of each strategy's entry: `continual.json["default"]["forgetting"]`.
    return {
        **summary,
        "settings": settings.model_dump(mode="json"),
        "matrix": matrix,
        "rounds": per_round,
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def print_result(name: str, result: dict[str, Any]) -> None:
    """Human-readable summary of one strategy."""
    s = result
    print(f"\n== {name} ==  wall {result['wall_seconds']:.0f} s (training {result['train_seconds']:.0f} s)")
    n = len(result["matrix"])
    print("R[i][j] (rows: after round i; cols: round j's facts)")
    for i, row in enumerate(result["matrix"]):
        print(f"  after {i + 1}: " + "  ".join(f"{x:.2f}" for x in row[:n]))
    for r in result["rounds"]:
        print(
            f"  round {r['round']}: paraphrase {r['paraphrase_em']:.2f}  general_kept {r['general_kept']:.2f}  "
            f"ppl_ratio {r['ppl_ratio']:.3f}  anchor_agreement {r['anchor_agreement']:.2f}  "
            f"{r['stopped']} after {r['epochs']} epochs, {r['tokens_per_s']} tok/s"
        )
    print(
        f"  average accuracy {s['average_accuracy']:.3f}  min trained EM {s['min_trained_em']:.3f}  "
        f"forgetting {s['forgetting']:.3f}  BWT {s['bwt']:+.3f}  paraphrase {s['final_paraphrase_em']:.3f}  "
        f"general_kept {s['general_kept']:.3f}  ppl_ratio {s['ppl_ratio']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated names")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--home", type=Path, default=default_home(), help="models and caches live under it")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--settings", default="{}", help="JSON overrides applied on top of every strategy")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    bundle = load_bundle(None, args.home / "models", args.home / "cache")
    rounds = load_rounds(args.data)[: args.rounds]
    extra = json.loads(args.settings)
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="engrain-continual-"))
    try:
        for name in args.strategies.split(","):
            overrides = STRATEGIES[name]
            settings = TrainSettings.model_validate({**TrainSettings().model_dump(), **overrides, **extra})
            results[name] = run_strategy(bundle, name, settings, rounds, work)
            print_result(name, results[name])
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(_with_meta(results, bundle, args), indent=1), encoding="utf-8")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _with_meta(results: dict[str, Any], bundle: Bundle, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "meta": {
            "model": bundle.model_dir.name,
            "rounds": args.rounds,
            "threads": os.cpu_count(),
            "base_probe_correct": sum(bundle.baseline.probe_correct),
            "base_ppl": bundle.baseline.reference_ppl,
        },
        **results,
    }


if __name__ == "__main__":
    main()
