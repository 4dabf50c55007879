"""Data hygiene: what measures general knowledge is never trained on, not even reworded.

A probe (or canary) "appears" in a prompt when its subject does (for a templated probe such as
"capital of France", any prompt naming France, whatever the question form), or when every content
word of a general probe is in the prompt ("How many legs does a spider have" against "Spider legs:
how many?"). Anchor prompts (trained with KL), the benchmark's facts and their paraphrases (trained,
then replayed) and the neighbour prompts derived from them are all checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from learning import anchors
from learning.anchors import Probe

FACTS = Path(__file__).parents[2] / "bench" / "data" / "continual.json"
STOP = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "is",
        "are",
        "was",
        "were",
        "what",
        "which",
        "who",
        "whom",
        "how",
        "many",
        "much",
        "does",
        "do",
        "did",
        "to",
        "for",
        "by",
        "and",
        "or",
        "with",
        "from",
        "at",
        "as",
        "it",
        "its",
        "this",
        "that",
        "be",
    ]
)


def words(text: str) -> list[str]:
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def appears(probe: Probe, prompt: str) -> bool:
    said = words(prompt)
    if probe.template != "general" and probe.subject:
        subject = [w for w in words(probe.subject) if w != "the"]
        if any(said[i : i + len(subject)] == subject for i in range(len(said) - len(subject) + 1)):
            return True
    content = {w for w in words(probe.prompt) if w not in STOP}
    return bool(content) and content <= set(said)


def trained_prompts() -> list[str]:
    train, evals = anchors.anchor_prompts()
    facts = json.loads(FACTS.read_text())
    questions = [q for r in facts["rounds"] for f in r for q in (f["prompt"], *f["paraphrases"])]
    return train + evals + questions


def test_the_benchmark_has_five_rounds_that_share_question_forms() -> None:
    rounds = json.loads(FACTS.read_text())["rounds"]
    assert len(rounds) >= 5 and all(len(r) >= 16 for r in rounds)
    for i, facts in enumerate(rounds[1:], start=1):
        seen = {f["template"] for r in rounds[:i] for f in r}
        shared = [f for f in facts if f["template"] in seen]
        assert len(shared) >= len(facts) / 2
    known = {p.template for p in anchors.probes()}
    assert len({f["template"] for f in rounds[0]} & known) >= 5  # forms the base knows real facts of
    answers = [f["key_answer"] for r in rounds for f in r]
    assert len(set(answers)) == len(answers)


@pytest.mark.parametrize("kind", ["probes", "canaries"])
def test_no_probe_or_canary_appears_in_what_is_trained(kind: str) -> None:
    items = anchors.probes() if kind == "probes" else anchors.canaries()
    prompts = trained_prompts()
    leaks = [(p.prompt, q) for p in items for q in prompts if appears(p, q)]
    assert not leaks, leaks[:5]


def test_the_leak_check_catches_rewordings() -> None:
    probe = Probe(prompt="What is the capital of France?", answers=["Paris"], template="capital", subject="France")
    assert appears(probe, "Tell me France's capital city.".replace("'s", ""))
    assert appears(probe, "What language is spoken in France?")
    general = Probe(prompt="How many legs does a spider have?", answers=["8"])
    assert appears(general, "Spider legs: how many does it have?")
    assert not appears(general, "How many legs does a dog have?")
