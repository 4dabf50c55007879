"""Training speed: our loop against TRL's SFTTrainer, and against this machine's fp32 peak.

Both trainers get the same base model (the cached embedded SmolLM2), the same LoRA config, the same
examples (the continual benchmark's facts plus the anchor answers: 50-130 tokens each), batch size,
learning rate and sequence limit, and are measured in the same process, alternating. Throughput is
real (non-padding) tokens per second of optimizer-step time; each side counts its own tokens.

The peak is the best fp32 matmul rate over a few shapes (including the model's own projection shapes)
on the same threads. A LoRA step costs about 4 x params FLOPs per token: 2 for the forward and 2 for
the backward to the activations (frozen weights need no weight gradients; the adapter adds < 4%).

    .venv/bin/python -m bench.train_speed --home /tmp/engrain-bench-home
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from bench.continual import PROTECTION_OFF, load_rounds
from learning import dataset, lora
from learning.anchors import ensure_baseline, train_anchors
from learning.batching import bucket_batches, padding_fraction
from learning.config import TrainSettings
from learning.examples import Example
from learning.formatting import encode_example
from learning.model_loading import ensure_base_model, load_base, setup_threads
from learning.train import train
from train_worker.settings import Settings

log = logging.getLogger("bench.train_speed")

RESULTS = Path(__file__).parent / "results" / "train_speed.json"
SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (512, 576, 1536), (512, 1536, 576), (512, 576, 576)]


def matmul_peak(dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> tuple[float, dict[str, float]]:
    """Best sustained matmul GFLOP/s over SHAPES (each timed for about `seconds`)."""
    rates: dict[str, float] = {}
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(5):
            reps, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds / 5:
                a @ b
                reps += 1
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - started) / 1e9)
        rates[f"{m}x{k}x{n}"] = round(best, 1)
    return max(rates.values()), rates


def examples(bundle_dir: Path, home: Path) -> list[Example]:
    """The 48 benchmark facts and 48 anchor answers (short and long), as one list of training examples."""
    model, tokenizer = load_base(bundle_dir)
    baseline = ensure_baseline(model, tokenizer, bundle_dir, home / "cache")
    facts = [e for r in load_rounds() for e in r][:48]
    return facts + [a.example for a in train_anchors(baseline)[:48]]


def run_ours(model_dir: Path, data: list[Example], settings: TrainSettings, epochs: int) -> dict[str, float]:
    """Our loop: response-only logits, length bucketing, fused AdamW."""
    base, tokenizer = load_base(model_dir)
    model = lora.attach_new(base, settings.adapter, seed=0)
    # Plain SFT, as TRL does it: the continual benchmark's naive strategy (no replay, anchors, neighbour
    # anchors, KL or EWC), without early stopping.
    s = settings.model_copy(update={"max_epochs": epochs, "early_stop_em": None, **PROTECTION_OFF})
    run = dataset.build(model, tokenizer, data, [], [], s)
    out = train(model, tokenizer, run, s, fingerprint="train-speed")
    lengths = [len(encode_example(tokenizer, e, s.max_seq_len)) for e in data]
    pad = padding_fraction(lengths, bucket_batches(lengths, s.batch_size, random.Random(0)))
    return {"tokens_per_s": out.tokens_per_s, "tokens": out.tokens, "seconds": out.train_seconds, "padding": pad}


class _StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.seconds, self.started = 0.0, 0.0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self.started = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.seconds += time.perf_counter() - self.started


def run_trl(model_dir: Path, data: list[Example], settings: TrainSettings, epochs: int) -> dict[str, float]:
    """TRL's SFTTrainer on the same model, adapter, data and batch size; bf16 and checkpointing off."""
    base, tokenizer = load_base(model_dir)
    base.requires_grad_(True)  # let peft decide what trains, as a TRL user would
    tokenizer.padding_side = "right"
    dataset = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": e.prompt}],
                "completion": [{"role": "assistant", "content": e.response}],
            }
            for e in data
        ]
    )
    timer = _StepTimer()
    with tempfile.TemporaryDirectory() as out_dir:
        config = SFTConfig(
            output_dir=out_dir,
            per_device_train_batch_size=settings.batch_size,
            num_train_epochs=epochs,
            learning_rate=settings.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=settings.warmup_steps,
            max_grad_norm=settings.grad_clip,
            weight_decay=settings.weight_decay,
            max_length=settings.max_seq_len,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=True,
            save_strategy="no",
            logging_steps=10_000,
            report_to="none",
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = SFTTrainer(
            model=base,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora.lora_config(settings.adapter),
            callbacks=[timer],
        )
        processed: Any = trainer.train_dataset
        tokens_per_epoch: int = sum(len(ids) for ids in processed["input_ids"])
        trainer.train()
    tokens = tokens_per_epoch * epochs
    return {"tokens_per_s": tokens / timer.seconds, "tokens": tokens, "seconds": timer.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=Settings().home)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements per trainer")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip-trl", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    threads = setup_threads()
    model_dir = ensure_base_model(None, args.home / "models")
    data = examples(model_dir, args.home)
    settings = TrainSettings()
    peak, rates = matmul_peak()
    bf16_peak, _ = matmul_peak(torch.bfloat16)
    ours: list[dict[str, float]] = []
    trl: list[dict[str, float]] = []
    for _ in range(args.repeats):
        ours.append(run_ours(model_dir, data, settings, args.epochs))
        log.info("ours: %.1f tok/s", ours[-1]["tokens_per_s"])
        if not args.skip_trl:
            trl.append(run_trl(model_dir, data, settings, args.epochs))
            log.info("trl: %.1f tok/s", trl[-1]["tokens_per_s"])
    base, _ = load_base(model_dir)
    n_params = sum(p.numel() for p in base.parameters())
    flops_per_token = 4 * n_params
    ours_tps = statistics.median(r["tokens_per_s"] for r in ours)
    trl_tps = statistics.median(r["tokens_per_s"] for r in trl) if trl else None
    achieved = ours_tps * flops_per_token / 1e9
    result = {
        "threads": threads,
        "examples": len(data),
        "batch_size": settings.batch_size,
        "adapter": settings.adapter.model_dump(mode="json"),
        "params": n_params,
        "flops_per_token": flops_per_token,
        "fp32_peak_gflops": peak,
        "fp32_matmul_gflops": rates,
        "bf16_peak_gflops": bf16_peak,
        "ours_tokens_per_s": round(ours_tps, 1),
        "trl_tokens_per_s": None if trl_tps is None else round(trl_tps, 1),
        "ratio_vs_trl": None if trl_tps is None else round(ours_tps / trl_tps, 2),
        "achieved_gflops": round(achieved, 1),
        "share_of_fp32_peak": round(achieved / peak, 3),
        "peak_tokens_per_s": round(peak * 1e9 / flops_per_token, 1),
        "padding_fraction": round(ours[0]["padding"], 4),
        "runs": {"ours": ours, "trl": trl},
    }
    print(f"fp32 matmul peak: {peak:.0f} GFLOP/s (best of {rates}); bf16 {bf16_peak:.0f} GFLOP/s")
    print(f"params {n_params / 1e6:.1f} M -> 4 x params = {flops_per_token / 1e9:.2f} GFLOP per token "
          f"-> peak {result['peak_tokens_per_s']} tok/s")  # fmt: skip
    print(f"ours: {ours_tps:.1f} tok/s = {achieved:.0f} GFLOP/s = {achieved / peak:.0%} of fp32 peak "
          f"(padding {result['padding_fraction']:.1%})")  # fmt: skip
    if trl_tps is not None:
        print(f"TRL SFTTrainer: {trl_tps:.1f} tok/s; ours / TRL = {ours_tps / trl_tps:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
