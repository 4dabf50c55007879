"""Where a trained adapter's general drift comes from: the same version, with parts of its update removed.

One round of `bench/data/continual.json` is taught through the product's path (`bench.continual`'s
session, one strategy, one seed). The deployed version is then evaluated again with parts of its
update switched off (its `lora_B` zeroed in some layers or modules) or scaled down. For each variant:
facts learnt, their paraphrases, general probes kept and the perplexity ratio, against the whole
adapter measured in the same run (the baseline row, `full`).

It answers two questions the continual benchmark cannot: is the drift the price of the update's
size (scale it down: does general knowledge come back before the facts go?), and which layers and
modules carry it.

    .venv/bin/python -m bench.ablation                     # default strategy, seed 0 -> bench/results/ablation.json
    .venv/bin/python -m bench.ablation --strategy bottom_two_thirds   # any strategy whose round 1 deploys
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import torch

from bench.continual import KERNEL, STRATEGIES, load_rounds, run_session, strategy_settings
from learning import lora
from learning.examples import Example
from learning.metrics import answer_items, measure_general
from learning.pipeline import Bundle, load_bundle
from learning.reports import Metrics
from train_worker.settings import Settings

log = logging.getLogger("bench.ablation")

RESULTS = Path(__file__).parent / "results" / "ablation.json"
LAYERS = 30  # the embedded model's decoder layers; thirds of 10


def _layer(name: str) -> int:
    found = re.search(r"layers\.(\d+)\.", name)
    return int(found.group(1)) if found else -1


# Each variant: which lora_B weights keep their value (by parameter name), and a scale for those kept.
Variant = tuple[Callable[[str], bool], float]
VARIANTS: dict[str, Variant] = {
    "full": (lambda n: True, 1.0),
    "scaled 0.85": (lambda n: True, 0.85),
    "scaled 0.7": (lambda n: True, 0.7),
    "layers 0-9 only": (lambda n: _layer(n) < LAYERS // 3, 1.0),
    "layers 10-19 only": (lambda n: LAYERS // 3 <= _layer(n) < 2 * LAYERS // 3, 1.0),
    "layers 20-29 only": (lambda n: _layer(n) >= 2 * LAYERS // 3, 1.0),
    "without layers 0-9": (lambda n: _layer(n) >= LAYERS // 3, 1.0),
    "without layers 20-29": (lambda n: _layer(n) < 2 * LAYERS // 3, 1.0),
    "without down_proj": (lambda n: "down_proj" not in n, 1.0),
    "down_proj only": (lambda n: "down_proj" in n, 1.0),
}


def evaluate(
    bundle: Bundle, version_dir: Path, facts: list[Example], keep: Callable[[str], bool], scale: float
) -> dict[str, Any]:
    """One variant of the saved version: facts, paraphrases, general probes and perplexity."""
    model = lora.attach_saved(bundle.model, version_dir, trainable=False)
    try:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale if keep(name) else 0.0)
        learnt = answer_items(model, bundle.tokenizer, [("new", e.prompt, e) for e in facts])
        para = answer_items(model, bundle.tokenizer, [("paraphrase", p, e) for e in facts for p in e.paraphrases])
        general = Metrics()
        measure_general(model, bundle.tokenizer, bundle.baseline, general)
    finally:
        bundle.model = model.unload()
    return {
        "learnt": sum(s.em for s in learnt) / len(learnt),
        "paraphrase_em": sum(s.em for s in para) / len(para),
        "general_kept": general.general_kept,
        "ppl_ratio": general.ppl_ratio,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="default", choices=sorted(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, default=Settings().home, help="the shared model and baseline caches")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "transformers", "peft", "learning", "train_worker", "server"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    bundle = load_bundle(None, args.home / "models", args.home / "cache")
    facts = load_rounds()[0]
    settings = strategy_settings(args.strategy, {}).model_copy(update={"seed": args.seed})
    work = Path(tempfile.mkdtemp(prefix="engrain-ablation-"))
    try:
        (row,) = anyio.run(run_session, bundle, args.home, settings, [facts], work)
        if row["status"] != "deployed":
            raise SystemExit(f"round 1 was not deployed ({row['status']}): nothing to take apart")
        version_dir = work / "home" / "kernels" / KERNEL / "versions" / "v1"
        variants: dict[str, Any] = {}
        for name, (keep, scale) in VARIANTS.items():
            variants[name] = evaluate(bundle, version_dir, facts, keep, scale)
            full = variants["full"]
            log.info(
                "%-22s learnt %.2f  paraphrase %.2f  general %.3f (x%.3f of full)  ppl x%.4f",
                name,
                variants[name]["learnt"],
                variants[name]["paraphrase_em"],
                variants[name]["general_kept"],
                variants[name]["general_kept"] / full["general_kept"],
                variants[name]["ppl_ratio"],
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.strategy] = {"seed": args.seed, "settings": settings.model_dump(mode="json"), "variants": variants}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
