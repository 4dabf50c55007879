"""Every evaluation metric of a candidate adapter, computed in one place.

- acquisition: key-answer containment ("exact match") and token F1 of greedy answers to the new items;
- paraphrase: the same on the new items' other wordings;
- retention: the same on held-back earlier items;
- general drift: agreement with the base model's answers on held-out anchor prompts, the share of
  probes the base got right that are still right, and perplexity on a reference text as a ratio;
- format: JSON-schema compliance of the answers when the kernel declares an output schema.

A metric that cannot be measured (no paraphrases, no earlier items, no schema) is None, never a default.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from learning import output_schema
from learning.anchors import EVAL_ANCHOR_TOKENS, Baseline, probe_results, probes, reference_text
from learning.examples import Example
from learning.formatting import encode_prompt
from learning.generate import decode, generate_ids
from learning.reports import ItemScore, Metrics
from learning.scoring import contains, perplexity, token_f1

log = logging.getLogger(__name__)

# An eval-anchor answer "still matches" the base when its token F1 against the base answer is at least this:
# half the words in common. Greedy continuations diverge after any small change, so exact match is too strict.
ANCHOR_MATCH_F1 = 0.5
GENERATION_BATCH = 32


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _schema_ok(answer: str, schema: dict[str, Any]) -> bool:
    return output_schema.matches(answer, schema)  # time-limited patterns, never recursive


def answer_items(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[tuple[str, str, Example]],
    output_schema: dict[str, Any] | None = None,
) -> list[ItemScore]:
    """Greedy-answer (id, prompt, example) triples and score each against the example's key answer.

    The token budget follows the longest expected response, so short facts decode in a few steps.
    """
    if not items:
        return []
    budget = max(len(tokenizer(e.response, add_special_tokens=False)["input_ids"]) for _, _, e in items)
    max_new = min(max(budget + 8, 16), 512)
    prompts = [encode_prompt(tokenizer, prompt, e.system) for _, prompt, e in items]
    outputs = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new, batch_size=GENERATION_BATCH)
    scores = []
    for (group, prompt, e), tokens in zip(items, outputs, strict=True):
        answer = decode(tokenizer, tokens)
        key = e.key_answer or e.response
        scores.append(
            ItemScore(
                id=e.id,
                group=group,
                prompt=prompt,
                answer=answer,
                em=contains(answer, key),
                f1=token_f1(answer, e.response),
                schema_ok=_schema_ok(answer, output_schema) if output_schema is not None else None,
            )
        )
    return scores


def anchor_agreement(model: nn.Module, tokenizer: PreTrainedTokenizerBase, baseline: Baseline) -> float | None:
    """Share of held-out anchor prompts whose greedy answer still matches the base model's answer."""
    if not baseline.eval_anchors:
        return None
    prompts = [encode_prompt(tokenizer, a.prompt) for a in baseline.eval_anchors]
    outputs = generate_ids(model, tokenizer, prompts, max_new_tokens=EVAL_ANCHOR_TOKENS, batch_size=GENERATION_BATCH)
    agree = [
        token_f1(decode(tokenizer, t), a.answer) >= ANCHOR_MATCH_F1
        for t, a in zip(outputs, baseline.eval_anchors, strict=True)
    ]
    return sum(agree) / len(agree)


def compute_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    new: Sequence[Example],
    held_back: Sequence[Example] = (),
    baseline: Baseline | None = None,
    output_schema: dict[str, Any] | None = None,
) -> Metrics:
    """Evaluate the model as it is (adapter active) on everything that applies; general metrics need `baseline`."""
    started = time.perf_counter()
    triples: list[tuple[str, str, Example]] = [("new", e.prompt, e) for e in new]
    triples += [("paraphrase", p, e) for e in new for p in e.paraphrases]
    triples += [("retention", e.prompt, e) for e in held_back]
    scores = answer_items(model, tokenizer, triples, output_schema)
    m = Metrics(items=scores)

    def group(name: str) -> list[ItemScore]:
        return [s for s in scores if s.group == name]

    m.acquisition_em = _mean([float(s.em) for s in group("new")])
    m.acquisition_f1 = _mean([s.f1 for s in group("new")])
    m.paraphrase_em = _mean([float(s.em) for s in group("paraphrase")])
    m.paraphrase_f1 = _mean([s.f1 for s in group("paraphrase")])
    m.retention_em = _mean([float(s.em) for s in group("retention")])
    m.retention_f1 = _mean([s.f1 for s in group("retention")])
    if output_schema is not None:
        m.schema_compliance = _mean([float(bool(s.schema_ok)) for s in scores])
    if baseline is not None:
        m.anchor_agreement = anchor_agreement(model, tokenizer, baseline)
        answers, correct = probe_results(model, tokenizer)
        base_right = [i for i, ok in enumerate(baseline.probe_correct) if ok]
        items = probes()
        m.lost_probes = [f"{items[i].prompt} -> {answers[i]}" for i in base_right if not correct[i]]
        m.general_kept = _mean([float(correct[i]) for i in base_right])
        m.probe_accuracy = _mean([float(c) for c in correct])
        m.base_probe_accuracy = _mean([float(c) for c in baseline.probe_correct])
        m.ppl = perplexity(model, tokenizer, reference_text())
        m.base_ppl = baseline.reference_ppl
        m.ppl_ratio = m.ppl / baseline.reference_ppl
    m.seconds = time.perf_counter() - started
    log.info("metrics computed in %.1f s", m.seconds)
    return m
