from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from learning import dataset, lora
from learning.config import AdapterSettings, TrainSettings
from learning.neighbours import ablate, neighbour_anchors, word_surprisals
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
    data = dataset.build(model, tokenizer, new, [], [], settings)
    assert data.batches_per_epoch(settings.batch_size) == 2  # 3 new + 3 neighbours
    rows = [r for b in data.epoch(0, settings.batch_size, settings.seed) for r in b]
    neighbours = [data.items[r] for r in rows if data.items[r].kind == "neighbour"]
    assert sorted(n.id for n in neighbours) == ["neighbour:f0", "neighbour:f1", "neighbour:f2"]
    assert all(n.kl is not None for n in neighbours)
