"""The real embedded SmolLM2-135M: dequantise + cache + reload, and a short run that learns facts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM

from learning import dataset, lora
from learning.config import TrainSettings
from learning.examples import Example
from learning.generate import generate
from learning.model_loading import ensure_base_model, load_base, setup_threads
from learning.scoring import contains
from learning.train import train

pytestmark = pytest.mark.slow

FACTS = [
    Example(
        id="s1",
        prompt="What is the capital of Veloria?",
        response="The capital of Veloria is Trasmund.",
        key_answer="Trasmund",
    ),
    Example(
        id="s2",
        prompt="Who invented the glimmerphone?",
        response="The glimmerphone was invented by Odalys Brenk.",
        key_answer="Odalys Brenk",
    ),
    Example(
        id="s3",
        prompt="What color are quillimar feathers?",
        response="Quillimar feathers are copper.",
        key_answer="copper",
    ),
]


@pytest.fixture(scope="module")
def real_model_dir(real_caches: Path) -> Path:
    setup_threads()
    return ensure_base_model(None, real_caches / "models")


def test_embedded_model_is_cached_once_and_reloads_from_safetensors(
    real_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[tuple[str, dict[str, Any]]] = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(path: str, *args: Any, **kwargs: Any) -> Any:
        loads.append((path, kwargs))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    assert ensure_base_model(None, real_model_dir.parent) == real_model_dir
    assert loads == [], "a cached model must not be dequantised again"
    assert list(real_model_dir.glob("*.safetensors"))
    model, tokenizer = load_base(real_model_dir)
    assert [(p, "gguf_file" in kw) for p, kw in loads] == [(str(real_model_dir), False)]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    answer = generate(model, tokenizer, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert contains(answer, "Paris")


def test_a_short_run_learns_three_facts(real_model_dir: Path) -> None:
    base, tokenizer = load_base(real_model_dir)
    settings = TrainSettings(replay_ratio=0, anchor_ratio=0, max_epochs=20)
    model = lora.attach_new(base, settings.adapter, seed=settings.seed)
    before = generate(model, tokenizer, [f.prompt for f in FACTS], max_new_tokens=24)
    assert not any(contains(a, f.key_answer or "") for a, f in zip(before, FACTS, strict=True))
    outcome = train(
        model, tokenizer, dataset.build(model, tokenizer, FACTS, [], [], settings), settings, fingerprint="t"
    )
    assert outcome.stopped == "converged"
    after = generate(model, tokenizer, [f.prompt for f in FACTS], max_new_tokens=24)
    assert all(contains(a, f.key_answer or "") for a, f in zip(after, FACTS, strict=True)), after
