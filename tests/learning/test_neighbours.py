from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from learning import lora
from learning.config import AdapterSettings, TrainSettings
from learning.neighbours import ablate, neighbour_anchors, word_surprisals
from learning.train import _Run
from tests.learning.conftest import facts, make_model


def spans(text: str, scores: dict[str, float]) -> list[tuple[int, int, float]]:
    out, pos = [], 0
    for word in text.replace("?", "").split():
        start = text.index(word, pos)
        out.append((start, start + len(word), scores.get(word, 1.0)))
        pos = start + len(word)
    return out


def test_ablate_removes_the_surprising_run_but_never_the_first_word() -> None:
    text = "What is the capital of Veloria?"
    assert ablate(text, spans(text, {"Veloria": 12.0})) == "What is the capital of?"
    name = "Who invented Odalys Brenk machines?"
    assert ablate(name, spans(name, {"Odalys": 9.0, "Brenk": 7.0})) == "Who invented machines?"
    assert ablate("Veloria rules?", spans("Veloria rules?", {"Veloria": 30.0})) == "Veloria?"
    assert ablate("Hi", spans("Hi", {})) is None


def test_word_surprisals_cover_every_word(tokenizer: PreTrainedTokenizerFast) -> None:
    model = make_model(tokenizer)
    words = word_surprisals(model, tokenizer, "What is code zub?")
    assert [w[:2] for w in words] == [(0, 4), (5, 7), (8, 12), (13, 16)]
    assert all(score > 0 for _, _, score in words)


def test_neighbours_are_base_answers_and_join_every_epoch(tokenizer: PreTrainedTokenizerFast) -> None:
    model = lora.attach_new(make_model(tokenizer), AdapterSettings(rank=4, alpha=8))
    new = facts(3)
    anchors = neighbour_anchors(model, tokenizer, new)
    assert [a.example.id for a in anchors] == ["neighbour:f0", "neighbour:f1", "neighbour:f2"]
    assert all(a.example.prompt != e.prompt for a, e in zip(anchors, new, strict=True))
    settings = TrainSettings(adapter=AdapterSettings(rank=4, alpha=8), batch_size=4, replay_ratio=0, anchor_ratio=0)
    run = _Run(model, tokenizer, new, [], [], settings)
    assert run.batches_per_epoch == 2  # 3 new + 3 neighbours
    keys = [k for b in run.plan_epoch(0) for k in b]
    assert sorted(k for k in keys if k.startswith("neighbour:")) == ["neighbour:0", "neighbour:1", "neighbour:2"]
    assert run.item("neighbour:0").kind == "anchor" and run.item("neighbour:0").kl is not None
