"""Every evaluation metric of a candidate adapter, computed in one place.

- acquisition: key-answer containment ("exact match") and token F1 of greedy answers to the new items;
- paraphrase: the same on the new items' other wordings;
- retention: every earlier fact of the kernel is a regression test. A fact is lost only when the
  version being replaced answered it right (`Prior`) and the candidate does not; facts that version
  never learnt do not count. Facts without a key answer (gold answers) are compared with that
  version's answer by token F1. `held_back_kept` is the same over the facts this run did not replay;
- must keep: canaries (basic facts the base knows) and the kernel's own must-keep list, by the same rule;
- general drift: agreement with the base model's answers on held-out anchor prompts (the share of the
  base answer's tokens the candidate would pick itself, teacher-forced), the share of probes the base
  got right that are still right, and perplexity on a reference text as a ratio;
- format: JSON-schema compliance of the answers when the kernel declares an output schema.

With a `Scope` (learning/scope.py), every item is answered as the host will serve it: by the adapter when
its prompt is in scope, by the base with the adapter switched off otherwise. Both are computed, never
assumed. `Metrics.routing` counts which items went where, so a scope that misses paraphrases shows.

Most of these are "still answered as before" questions: `learning.greedy_check.ask` settles those with
one teacher-forced pass and generates only the answers that changed. A metric that cannot be measured
(no paraphrases, no earlier items, no schema) is None, never a default.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from learning import output_schema
from learning.anchors import PROBE_TOKENS, Baseline, canaries, probes, reference_text
from learning.config import KeepFact
from learning.examples import Example
from learning.formatting import encode_example, encode_prompt
from learning.greedy_check import Ask, Reply, ask, follows
from learning.reports import ItemScore, LostItem, Metrics, NewFact, Routing
from learning.scope import Scope
from learning.scoring import contains, contains_any, normalise, perplexity, token_f1

log = logging.getLogger(__name__)

# An answer "still matches" another when their token F1 is at least this: half the words in common.
# Greedy continuations diverge after any small change, so exact match is too strict.
MATCH_F1 = 0.5
ANSWER_SLACK = 8  # tokens allowed beyond the expected response when an answer must be generated
PROBE_SLACK = 16  # tokens allowed beyond where the base named the answer, when a changed answer is generated


@dataclass(frozen=True)
class MustKeep:
    """A fact the kernel must never lose: a canary or an item of the kernel's must-keep list."""

    id: str
    prompt: str
    answers: tuple[str, ...]
    path: tuple[int, ...] = ()  # the base model's tokens up to the answer, when known


@dataclass(frozen=True)
class Prior:
    """What the version being replaced answered: per earlier fact and must-keep item, its answer and verdict."""

    answers: dict[str, str]
    right: dict[str, bool]

    def to_json(self) -> dict[str, Any]:
        return {"answers": self.answers, "right": self.right}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prior:
        return cls(answers=dict(data["answers"]), right={k: bool(v) for k, v in data["right"].items()})


def must_keep_items(baseline: Baseline | None, extra: Sequence[KeepFact] = ()) -> list[MustKeep]:
    """The packaged canaries the base answers right (with their paths), then the kernel's own list."""
    items: list[MustKeep] = []
    if baseline is not None:
        for i, (probe, base) in enumerate(zip(canaries(), baseline.canaries, strict=True)):
            if base.correct:
                items.append(MustKeep(f"canary:{i}", probe.prompt, tuple(probe.answers), tuple(base.path)))
    items += [MustKeep(f"must_keep:{i}", p.prompt, tuple(p.answers)) for i, p in enumerate(extra)]
    return items


def _key(e: Example) -> str:
    return e.key_answer or e.response


def _fact_ask(tokenizer: PreTrainedTokenizerBase, prompt: str, e: Example, *, stop_early: bool) -> Ask:
    """Expect the trained response; otherwise generate until the key answer is named (or the budget ends)."""
    target = encode_example(tokenizer, e.model_copy(update={"prompt": prompt}), 4096)
    expected = [t for t, label in zip(target.input_ids, target.labels, strict=True) if label != -100]
    key = _key(e)
    named = (lambda text: contains(text, key)) if stop_early and e.key_answer else None
    return Ask(
        prompt=encode_prompt(tokenizer, prompt, e.system),
        expected=expected,
        budget=min(len(expected) + ANSWER_SLACK, 512),
        named=named,
    )


def _must_keep_ask(tokenizer: PreTrainedTokenizerBase, item: MustKeep) -> Ask:
    return Ask(
        prompt=encode_prompt(tokenizer, item.prompt),
        expected=list(item.path),
        budget=len(item.path) + PROBE_SLACK if item.path else PROBE_TOKENS,
        named=lambda text: contains_any(text, item.answers),
    )


@contextlib.contextmanager
def base_only(model: nn.Module, when: bool = True) -> Iterator[None]:
    """The bare base model for the duration (if `when`): the adapter off, as the host serves out-of-scope prompts."""
    disable = getattr(model, "disable_adapter", None)
    with disable() if disable is not None and when else contextlib.nullcontext():
        yield


def routed_ask(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, asks: Sequence[Ask], texts: Sequence[str], scope: Scope | None
) -> tuple[list[Reply], list[bool]]:
    """Replies as served (the adapter for prompts in `scope`, the base for the rest), and which were in scope."""
    inside = [scope is None or scope.covers(t) for t in texts]
    replies: list[Reply | None] = [None] * len(asks)
    for adapted in (True, False):
        rows = [i for i, s in enumerate(inside) if s == adapted]
        if not rows:
            continue
        with base_only(model, when=not adapted):
            for i, reply in zip(rows, ask(model, tokenizer, [asks[i] for i in rows]), strict=True):
                replies[i] = reply
    return [r for r in replies if r is not None], inside


def assess_prior(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    earlier: Sequence[Example],
    must_keep: Sequence[MustKeep],
    scope: Scope | None = None,
) -> Prior:
    """What the version being replaced answers, as served under its `scope`, to earlier facts and must-keep items."""
    asks = [_fact_ask(tokenizer, e.prompt, e, stop_early=True) for e in earlier]
    asks += [_must_keep_ask(tokenizer, m) for m in must_keep]
    replies, _ = routed_ask(model, tokenizer, asks, [e.prompt for e in earlier] + [m.prompt for m in must_keep], scope)
    answers: dict[str, str] = {}
    right: dict[str, bool] = {}
    for e, r in zip(earlier, replies[: len(earlier)], strict=True):
        answers[e.id] = r.text
        right[e.id] = contains(r.text, e.key_answer) if e.key_answer else token_f1(r.text, e.response) >= MATCH_F1
    for m, r in zip(must_keep, replies[len(earlier) :], strict=True):
        answers[m.id] = r.text
        right[m.id] = contains_any(r.text, m.answers)
    return Prior(answers=answers, right=right)


def _overwriter(answer: str, prompt: str, new: Sequence[Example]) -> NewFact | None:
    """The new fact whose answer `answer` now gives; else the new fact whose question reads most alike."""
    if not new:
        return None
    named = [n for n in new if contains(answer, _key(n))]
    if named:
        best = named[0]
    else:
        words = set(normalise(prompt))

        def overlap(n: Example) -> float:
            other = set(normalise(n.prompt))
            return len(words & other) / max(len(words | other), 1)

        best = max(new, key=overlap)
        if overlap(best) == 0:
            return None
    return NewFact(id=best.id, prompt=best.prompt, key_answer=_key(best))


def schema_ok(answer: str, schema: dict[str, Any]) -> bool:
    return output_schema.matches(answer, schema)  # time-limited patterns, never recursive


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compute_metrics(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    new: Sequence[Example],
    earlier: Sequence[Example] = (),
    replayed: Collection[str] = (),
    prior: Prior | None = None,
    must_keep: Sequence[MustKeep] = (),
    baseline: Baseline | None = None,
    output_schema: dict[str, Any] | None = None,
    scope: Scope | None = None,
) -> Metrics:
    """Evaluate the model as served under `scope` (None: the adapter answers everything).

    Retention and must-keep need `prior`; drift needs `baseline`.
    """
    started = time.perf_counter()
    stop_early = output_schema is None  # a schema is checked on whole answers
    groups: list[tuple[str, str, Example]] = [("new", e.prompt, e) for e in new]
    groups += [("paraphrase", p, e) for e in new for p in e.paraphrases]
    if prior is not None:
        groups += [("earlier", e.prompt, e) for e in earlier]
    asks = [_fact_ask(tokenizer, prompt, e, stop_early=stop_early) for _, prompt, e in groups]
    checked_keep = list(must_keep) if prior is not None else []
    asks += [_must_keep_ask(tokenizer, m) for m in checked_keep]
    texts = [prompt for _, prompt, _ in groups] + [k.prompt for k in checked_keep]
    replies, inside = routed_ask(model, tokenizer, asks, texts, scope)
    m = Metrics()
    if scope is not None:
        outside = collections.Counter(kind for (kind, _, _), i in zip(groups, inside, strict=False) if not i)
        m.routing = Routing(
            new_out=outside["new"],
            paraphrases_out=outside["paraphrase"],
            earlier_out=outside["earlier"],
            must_keep_in=sum(inside[len(groups) :]),
        )
    scores: list[ItemScore] = []
    for (kind, prompt, e), reply in zip(groups, replies, strict=False):
        before = prior.right.get(e.id) if prior is not None and kind == "earlier" else None
        if kind == "earlier" and not e.key_answer and prior is not None:
            em = token_f1(reply.text, prior.answers.get(e.id, e.response)) >= MATCH_F1
        else:
            em = contains(reply.text, _key(e))
        scores.append(
            ItemScore(
                id=e.id,
                group=kind,
                prompt=prompt,
                answer=reply.text,
                em=em,
                f1=token_f1(reply.text, e.response),
                schema_ok=schema_ok(reply.text, output_schema) if output_schema is not None else None,
                before=before,
                replayed=(e.id in replayed) if kind == "earlier" else None,
            )
        )
    for item, reply in zip(checked_keep, replies[len(groups) :], strict=True):
        scores.append(
            ItemScore(
                id=item.id,
                group="must_keep",
                prompt=item.prompt,
                answer=reply.text,
                em=contains_any(reply.text, item.answers),
                f1=0.0,
                before=prior.right.get(item.id) if prior is not None else None,
            )
        )
    m.items = scores

    def group(name: str) -> list[ItemScore]:
        return [s for s in scores if s.group == name]

    m.acquisition_em = _mean([float(s.em) for s in group("new")])
    m.acquisition_f1 = _mean([s.f1 for s in group("new")])
    m.paraphrase_em = _mean([float(s.em) for s in group("paraphrase")])
    m.paraphrase_f1 = _mean([s.f1 for s in group("paraphrase")])
    known = [s for s in group("earlier") if s.before]
    m.earlier_known = len(known) if prior is not None else None
    m.earlier_lost = sum(not s.em for s in known) if prior is not None else None
    m.retention_kept = _mean([float(s.em) for s in known])
    m.held_back_kept = _mean([float(s.em) for s in known if not s.replayed])
    kept_before = [s for s in group("must_keep") if s.before]
    m.must_keep_checked = len(kept_before) if prior is not None else None
    m.must_keep_lost = sum(not s.em for s in kept_before) if prior is not None else None
    by_id = {e.id: e for e in earlier}
    keep_by_id = {k.id: k for k in checked_keep}
    for s in scores:
        if s.group == "earlier" and s.before and not s.em:
            e = by_id[s.id]
            expected = e.key_answer or (prior.answers.get(e.id, e.response) if prior is not None else e.response)
            lost = LostItem(id=s.id, group=s.group, prompt=s.prompt, expected=expected, answer=s.answer)
            m.lost.append(lost.model_copy(update={"overwritten_by": _overwriter(s.answer, s.prompt, new)}))
        elif s.group == "must_keep" and s.before and not s.em:
            keep = keep_by_id[s.id]
            m.lost.append(
                LostItem(
                    id=s.id,
                    group=s.group,
                    prompt=s.prompt,
                    expected=" / ".join(keep.answers),
                    answer=s.answer,
                    overwritten_by=_overwriter(s.answer, s.prompt, new),
                )
            )
    if output_schema is not None:
        m.schema_compliance = _mean([float(bool(s.schema_ok)) for s in scores if s.schema_ok is not None])
    if baseline is not None:
        measure_general(model, tokenizer, baseline, m, scope)
    m.seconds = time.perf_counter() - started
    log.info("metrics computed in %.1f s", m.seconds)
    return m


def measure_general(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    baseline: Baseline,
    m: Metrics,
    scope: Scope | None = None,
) -> None:
    """Anchor agreement, probes kept and the perplexity ratio, against the base model's baseline, as served."""
    anchors = [a for a in baseline.eval_anchors if a.ids]
    if anchors:
        pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
        agreement = 0.0
        for adapted in (True, False):
            rows = [a for a in anchors if (scope is None or scope.covers(a.prompt)) == adapted]
            if not rows:
                continue
            with base_only(model, when=not adapted):
                prompts = [encode_prompt(tokenizer, a.prompt) for a in rows]
                agreement += sum(c.agreement for c in follows(model, prompts, [a.ids for a in rows], pad))
        m.anchor_agreement = agreement / len(anchors)
    items = probes()
    base_right = [i for i, b in enumerate(baseline.probes) if b.correct]
    as_items = [
        MustKeep(f"probe:{i}", items[i].prompt, tuple(items[i].answers), tuple(baseline.probes[i].path))
        for i in base_right
    ]
    probe_replies, inside = routed_ask(
        model, tokenizer, [_must_keep_ask(tokenizer, item) for item in as_items], [i.prompt for i in as_items], scope
    )
    if m.routing is not None:
        m.routing.probes_in = sum(inside)
    kept = [contains_any(r.text, items[i].answers) for r, i in zip(probe_replies, base_right, strict=True)]
    m.probes_checked = len(base_right)
    m.general_kept = _mean([float(k) for k in kept])
    m.lost_probes = [
        f"{items[i].prompt} -> {r.text}" for r, i, k in zip(probe_replies, base_right, kept, strict=True) if not k
    ]
    text = reference_text()
    with base_only(model, when=scope is not None and not scope.covers(text)):
        m.ppl = perplexity(model, tokenizer, text)
    m.base_ppl = baseline.reference_ppl
    m.ppl_ratio = m.ppl / baseline.reference_ppl


def answer_items(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[tuple[str, str, Example]],
    output_schema: dict[str, Any] | None = None,
    scope: Scope | None = None,
) -> list[ItemScore]:
    """Greedy-answer (group, prompt, example) triples as served under `scope`; score each by its key answer."""
    asks = [_fact_ask(tokenizer, prompt, e, stop_early=output_schema is None) for _, prompt, e in items]
    replies, _ = routed_ask(model, tokenizer, asks, [prompt for _, prompt, _ in items], scope)
    return [
        ItemScore(
            id=e.id,
            group=group,
            prompt=prompt,
            answer=r.text,
            em=contains(r.text, _key(e)),
            f1=token_f1(r.text, e.response),
            schema_ok=schema_ok(r.text, output_schema) if output_schema is not None else None,
        )
        for (group, prompt, e), r in zip(items, replies, strict=True)
    ]
