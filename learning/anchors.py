"""The general-knowledge side of training and evaluation, and the base model's cached baseline.

Packaged data (`learning/data/`): anchor prompts split into train and held-out eval, knowledge probes
with accepted answers, and a reference text for perplexity. For each base model the baseline (its
greedy anchor answers, its probe answers, its reference perplexity) is computed once and cached as
JSON under the cache directory, keyed by a fingerprint of the model and of this data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import PreTrainedTokenizerBase

from learning.examples import Example
from learning.formatting import encode_prompt
from learning.fsutil import atomic_write_text
from learning.generate import decode, finished, generate_ids
from learning.scoring import contains_any, perplexity

log = logging.getLogger(__name__)

BASELINE_VERSION = 1
TRAIN_ANCHOR_TOKENS = 64  # longer anchor answers cost training time without adding much signal
EVAL_ANCHOR_TOKENS = 48
PROBE_TOKENS = 64  # the base often states the answer after a preamble; 32 tokens cut some off


class Probe(BaseModel):
    """A general-knowledge question and the answers that count as correct."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    answers: list[str]


class AnchorAnswer(BaseModel):
    """The base model's greedy answer to one anchor prompt; `finished` is False when cut at the limit."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    answer: str
    finished: bool


class Baseline(BaseModel):
    """What the base model does on the general sets, cached per base model."""

    model_config = ConfigDict(extra="forbid")

    version: int = BASELINE_VERSION
    fingerprint: str
    train_anchors: list[AnchorAnswer]
    eval_anchors: list[AnchorAnswer]
    probe_answers: list[str]
    probe_correct: list[bool]
    reference_ppl: float
    seconds: float


@dataclass(frozen=True)
class Anchor:
    """A self-distillation training item: the base's own answer, with eos only if the base stopped."""

    example: Example
    finished: bool


def _data_text(name: str) -> str:
    return resources.files("learning").joinpath("data", name).read_text(encoding="utf-8")


def anchor_prompts() -> tuple[list[str], list[str]]:
    """The packaged (train, eval) anchor prompts."""
    data = json.loads(_data_text("anchor_prompts.json"))
    return list(data["train"]), list(data["eval"])


def probes() -> list[Probe]:
    """The packaged general-knowledge probes."""
    return [Probe.model_validate(p) for p in json.loads(_data_text("probes.json"))]


def reference_text() -> str:
    """The packaged reference prose for perplexity."""
    return _data_text("reference.txt")


def fingerprint(model_dir: Path) -> str:
    """Identifies a base model and the packaged data: config, weight file sizes, data contents."""
    h = hashlib.sha256()
    h.update(f"v{BASELINE_VERSION}:{TRAIN_ANCHOR_TOKENS}:{EVAL_ANCHOR_TOKENS}:{PROBE_TOKENS}".encode())
    h.update((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    for name in ("anchor_prompts.json", "probes.json", "reference.txt"):
        h.update(_data_text(name).encode())
    return h.hexdigest()[:16]


def greedy_answers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> list[tuple[str, bool]]:
    """(answer, finished) for each prompt, with the default system prompt, as training formats them."""
    ids = generate_ids(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], max_new_tokens=max_new_tokens)
    return [(decode(tokenizer, t), finished(t, tokenizer)) for t in ids]


def probe_results(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[bool]]:
    """The model's answers to the probes and whether each is correct."""
    items = probes()
    answers = [a for a, _ in greedy_answers(model, tokenizer, [p.prompt for p in items], PROBE_TOKENS)]
    return answers, [contains_any(a, p.answers) for a, p in zip(answers, items, strict=True)]


def compute_baseline(model: nn.Module, tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> Baseline:
    """Run the base model (no adapter) over the anchor prompts, the probes and the reference text."""
    started = time.perf_counter()
    train_prompts, eval_prompts = anchor_prompts()
    train = greedy_answers(model, tokenizer, train_prompts, TRAIN_ANCHOR_TOKENS)
    evals = greedy_answers(model, tokenizer, eval_prompts, EVAL_ANCHOR_TOKENS)
    probe_answers, probe_correct = probe_results(model, tokenizer)
    return Baseline(
        fingerprint=fingerprint(model_dir),
        train_anchors=[
            AnchorAnswer(prompt=p, answer=a, finished=f) for p, (a, f) in zip(train_prompts, train, strict=True)
        ],
        eval_anchors=[
            AnchorAnswer(prompt=p, answer=a, finished=f) for p, (a, f) in zip(eval_prompts, evals, strict=True)
        ],
        probe_answers=probe_answers,
        probe_correct=probe_correct,
        reference_ppl=perplexity(model, tokenizer, reference_text()),
        seconds=time.perf_counter() - started,
    )


def baseline_path(cache_dir: Path, model_dir: Path) -> Path:
    """Where the baseline of this base model is cached."""
    return cache_dir / "baselines" / f"{fingerprint(model_dir)}.json"


def ensure_baseline(model: nn.Module, tokenizer: PreTrainedTokenizerBase, model_dir: Path, cache_dir: Path) -> Baseline:
    """The cached baseline for this base model, computed (about a minute on 2 cores) and saved if missing.

    `model` must be the bare base model, or a peft model whose adapter is disabled by the caller.
    """
    path = baseline_path(cache_dir, model_dir)
    if path.is_file():
        try:
            cached = Baseline.model_validate_json(path.read_text(encoding="utf-8"))
            if cached.version == BASELINE_VERSION:
                return cached
        except ValueError:
            log.warning("ignoring an unreadable baseline cache at %s", path)
    log.info("computing the base model's baseline (anchors, probes, reference perplexity)")
    baseline = compute_baseline(model, tokenizer, model_dir)
    atomic_write_text(path, baseline.model_dump_json(indent=1))
    log.info("baseline cached at %s in %.1f s", path, baseline.seconds)
    return baseline


def train_anchors(baseline: Baseline) -> list[Anchor]:
    """The train-split anchors as self-distillation items."""
    return [
        Anchor(example=Example(id=f"anchor:{i}", prompt=a.prompt, response=a.answer), finished=a.finished)
        for i, a in enumerate(baseline.train_anchors)
        if a.answer
    ]
