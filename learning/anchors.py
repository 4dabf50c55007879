"""The general-knowledge side of training and evaluation, and the base model's cached baseline.

Packaged data (`learning/data/`): anchor prompts split into train and held-out eval, knowledge probes
with accepted answers, canaries (basic facts a must-keep gate guards), and a reference text for
perplexity. For each base model the baseline (its greedy anchor answers, its probe and canary answers
with the token path up to the accepted answer, its reference perplexity) is computed once and cached
as JSON under the cache directory, keyed by a fingerprint of the model and of this data. The token
paths let evaluation settle "still answered the same way" with one teacher-forced pass
(`learning/greedy_check.py`) instead of generating every answer again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import PreTrainedTokenizerBase

from learning.examples import Example
from learning.formatting import encode_prompt
from learning.fsutil import atomic_write_text
from learning.generate import decode, finished, generate_ids
from learning.scoring import contains_any, perplexity

log = logging.getLogger(__name__)

BASELINE_VERSION = 2
TRAIN_ANCHOR_TOKENS = 64  # longer anchor answers cost training time without adding much signal
EVAL_ANCHOR_TOKENS = 48
PROBE_TOKENS = 64  # the base often states the answer after a preamble; 32 tokens cut some off
GENERATION_BATCH = 32  # decoding is memory-bound: a wide batch costs little more than a narrow one


class Probe(BaseModel):
    """A general-knowledge question and the answers that count as correct."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    answers: list[str]
    template: str = Field(default="general", description="The question's form, e.g. 'capital' (data hygiene tests).")
    subject: str | None = Field(default=None, description="What the question is about, e.g. 'France'.")


class Answered(BaseModel):
    """The base model's greedy answer to a probe or canary, and its tokens up to the accepted answer."""

    model_config = ConfigDict(extra="forbid")

    answer: str
    correct: bool
    path: list[int] = Field(description="Answer tokens up to where an accepted answer first appears; [] if never.")


class AnchorAnswer(BaseModel):
    """The base model's greedy answer to one anchor prompt; `finished` is False when cut at the limit."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    answer: str
    finished: bool
    ids: list[int] = Field(default_factory=list, description="The answer's tokens as generated.")


class Baseline(BaseModel):
    """What the base model does on the general sets, cached per base model."""

    model_config = ConfigDict(extra="forbid")

    version: int = BASELINE_VERSION
    fingerprint: str
    train_anchors: list[AnchorAnswer]
    eval_anchors: list[AnchorAnswer]
    probes: list[Answered]
    canaries: list[Answered]
    reference_ppl: float
    seconds: float

    @property
    def probe_correct(self) -> list[bool]:
        return [p.correct for p in self.probes]


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


def canaries() -> list[Probe]:
    """The packaged canaries: basic facts every kernel must keep (the must-keep gate)."""
    return [Probe.model_validate(p) for p in json.loads(_data_text("canaries.json"))]


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
    for name in ("anchor_prompts.json", "probes.json", "canaries.json", "reference.txt"):
        h.update(_data_text(name).encode())
    return h.hexdigest()[:16]


def greedy_answers(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> list[AnchorAnswer]:
    """Each prompt's greedy answer, with the default system prompt, as training formats them."""
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    ids = generate_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=GENERATION_BATCH)
    return [
        AnchorAnswer(prompt=p, answer=decode(tokenizer, t), finished=finished(t, tokenizer), ids=t)
        for p, t in zip(prompts, ids, strict=True)
    ]


def answer_probes(model: nn.Module, tokenizer: PreTrainedTokenizerBase, items: Sequence[Probe]) -> list[Answered]:
    """Greedy answers to probes (or canaries), each stopped as soon as it names an accepted answer."""
    encoded = [encode_prompt(tokenizer, p.prompt) for p in items]

    def named(i: int, tokens: list[int]) -> bool:
        return contains_any(decode(tokenizer, tokens), items[i].answers)

    outputs = generate_ids(
        model, tokenizer, encoded, max_new_tokens=PROBE_TOKENS, batch_size=GENERATION_BATCH, stop=named
    )
    out = []
    for item, tokens in zip(items, outputs, strict=True):
        text = decode(tokenizer, tokens)
        correct = contains_any(text, item.answers)
        out.append(Answered(answer=text, correct=correct, path=tokens if correct else []))
    return out


def compute_baseline(model: nn.Module, tokenizer: PreTrainedTokenizerBase, model_dir: Path) -> Baseline:
    """Run the base model (no adapter) over the anchor prompts, probes, canaries and the reference text."""
    started = time.perf_counter()
    train_prompts, eval_prompts = anchor_prompts()
    return Baseline(
        fingerprint=fingerprint(model_dir),
        train_anchors=greedy_answers(model, tokenizer, train_prompts, TRAIN_ANCHOR_TOKENS),
        eval_anchors=greedy_answers(model, tokenizer, eval_prompts, EVAL_ANCHOR_TOKENS),
        probes=answer_probes(model, tokenizer, probes()),
        canaries=answer_probes(model, tokenizer, canaries()),
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
