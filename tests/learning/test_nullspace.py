from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from learning import lora, nullspace
from learning.config import AdapterSettings, NullSpaceSettings
from learning.formatting import encode_example
from tests.learning.conftest import facts, make_model


def test_quiet_directions_are_those_below_the_threshold_times_the_median() -> None:
    basis_in = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))[0]
    values = torch.tensor([1e4, 50.0, 10.0, 5.0, 2.0, 1e-1, 1e-3], dtype=torch.float64)  # an outlier, as real keys
    cov = basis_in @ torch.diag(values) @ basis_in.T
    basis, median = nullspace.quiet_directions(cov, threshold=0.5)
    assert median == pytest.approx(5.0) and basis.shape == (7, 3)  # 2.0, 0.1 and 0.001 are below 2.5
    # The kept directions are the three quietest: the loud ones project to (almost) nothing.
    assert torch.allclose(basis.T.double() @ basis_in[:, :4], torch.zeros(3, 4, dtype=torch.float64), atol=1e-5)


def test_restrict_removes_what_earlier_keys_use() -> None:
    basis = torch.eye(4)[:, :3]  # allowed: e0, e1, e2
    fact = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # an earlier fact's key along e1
    cov = (fact.T @ fact).double()
    kept = nullspace.restrict(basis, cov, limit=1e-3)
    assert kept.shape == (4, 2)
    assert torch.allclose(kept.T @ fact.T, torch.zeros(2, 1), atol=1e-6)


def test_a_projected_update_leaves_preserved_text_alone(tokenizer: PreTrainedTokenizerFast) -> None:
    """The guarantee: with every adapter A projected, the logits on preserved sequences do not move."""
    torch.manual_seed(0)
    model = lora.attach_new(make_model(tokenizer), AdapterSettings(rank=4, alpha=8))
    general = [encode_example(tokenizer, e, 64).input_ids for e in facts(40, prefix="g")]
    preserved = [encode_example(tokenizer, e, 64).input_ids for e in facts(1)]
    other = encode_example(tokenizer, facts(1, prefix="x")[0], 64).input_ids
    params = lora.trainable_params(model)
    # General text allows every direction here; the earlier fact's keys are the hard constraint.
    settings = NullSpaceSettings(general_threshold=1000.0, facts_threshold=1e-9)
    projector = nullspace.build_projector(
        model, params, 0, lambda: general, preserved, settings, int(tokenizer.pad_token_id), None
    )
    assert min(projector.dimensions().values()) > 0

    def moved(ids: list[int]) -> float:
        """How far the adapter moves the logits on one sequence."""
        model.eval()
        with torch.no_grad():
            on = model(input_ids=torch.tensor([ids])).logits
            with model.disable_adapter():
                off = model(input_ids=torch.tensor([ids])).logits
        return float((on - off).abs().max())

    with torch.no_grad():
        for p in params.values():
            p.copy_(0.1 * torch.randn_like(p))  # an arbitrary update
    unprojected = moved(preserved[0])
    projector()
    assert moved(preserved[0]) < 1e-3 * unprojected  # float32 rounding is all that is left
    assert moved(other) > 0.05 * unprojected  # elsewhere the update still acts


def test_general_bases_are_cached(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    model = lora.attach_new(make_model(tokenizer), AdapterSettings(rank=4, alpha=8))
    sequences = [encode_example(tokenizer, e, 64).input_ids for e in facts(3)]
    cache = tmp_path / "bases.safetensors"
    calls = []

    def general() -> list[list[int]]:
        calls.append(1)
        return sequences

    params = lora.trainable_params(model)
    settings = NullSpaceSettings(facts=False)
    first = nullspace.build_projector(model, params, 0, general, [], settings, int(tokenizer.pad_token_id), cache)
    second = nullspace.build_projector(model, params, 0, general, [], settings, int(tokenizer.pad_token_id), cache)
    assert calls == [1] and cache.is_file()
    assert all(torch.equal(first.bases[k], second.bases[k]) for k in first.bases)
