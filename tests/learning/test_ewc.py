from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from learning import ewc


def test_penalty_is_zero_at_the_anchor_and_grows_away_from_it() -> None:
    anchor = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}
    fisher = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[2.0]])}
    assert float(ewc.penalty(anchor, anchor, fisher)) == 0.0
    moved = {"a": torch.tensor([1.5, 2.0]), "b": torch.tensor([[0.5]])}
    assert float(ewc.penalty(moved, anchor, fisher)) == pytest.approx(0.25)
    further = {"a": torch.tensor([1.5, 3.0]), "b": torch.tensor([[1.5]])}
    assert float(ewc.penalty(further, anchor, fisher)) == pytest.approx(0.25 + 3.0 + 2.0)


def test_penalty_gradient_pulls_back_towards_the_anchor() -> None:
    anchor = {"w": torch.zeros(3)}
    fisher = {"w": torch.ones(3)}
    w = torch.tensor([1.0, -2.0, 0.0], requires_grad=True)
    torch.autograd.backward(ewc.penalty({"w": w}, anchor, fisher))
    assert w.grad is not None
    assert w.grad.tolist() == [2.0, -4.0, 0.0]


def test_empirical_fisher_is_the_mean_of_per_example_squared_gradients() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    xs = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5])]

    def loss_of(x: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: (w * x).sum() ** 2

    fisher = ewc.empirical_fisher({"w": w}, [loss_of(x) for x in xs])
    expected = sum((2 * float((torch.tensor([1.0, -1.0]) * x).sum()) * x) ** 2 for x in xs) / 2
    torch.testing.assert_close(fisher["w"], expected)
    assert w.grad is None


def test_merge_normalise_and_roundtrip(tmp_path: Path) -> None:
    old = {"a": torch.tensor([2.0, 2.0])}
    new = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([4.0])}
    merged = ewc.merge_fisher(old, new, decay=0.5)
    assert merged["a"].tolist() == [2.0, 4.0] and merged["b"].tolist() == [4.0]
    assert ewc.merge_fisher(None, new, 0.5) == new
    norm = ewc.normalised(merged)
    mean = sum(float(v.sum()) for v in norm.values()) / sum(v.numel() for v in norm.values())
    assert mean == pytest.approx(1.0)
    ewc.save_fisher(tmp_path / "f.safetensors", merged)
    loaded = ewc.load_fisher(tmp_path / "f.safetensors")
    assert loaded.keys() == merged.keys()
    assert all(torch.equal(loaded[k], merged[k]) for k in merged)
