from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from learning.batching import collate
from learning.examples import Example
from learning.formatting import IGNORE_INDEX, encode_example
from learning.losses import hidden_states, per_row_mean, selected_logits, target_mask, token_ce, topk_kl, topk_logprobs


def test_selected_logits_match_the_full_forward(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    items = [
        encode_example(tokenizer, Example(id=str(i), prompt=f"q{i}" * (i + 1), response="ans"), 128) for i in range(3)
    ]
    b = collate(items, range(3), tokenizer.pad_token_id)
    mask = target_mask(b.labels)
    with torch.no_grad():
        full = tiny_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1][mask]
        part = selected_logits(tiny_model, hidden_states(tiny_model, b.input_ids, b.attention_mask), mask)
    assert part.shape[0] == sum(e.n_target for e in items)
    torch.testing.assert_close(part, full, rtol=1e-4, atol=1e-5)


def test_response_only_loss_equals_masked_full_cross_entropy(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    enc = encode_example(tokenizer, Example(id="a", prompt="What is it?", response="It is zub."), 128)
    b = collate([enc], [0], tokenizer.pad_token_id)
    with torch.no_grad():
        mask = target_mask(b.labels)
        ours = token_ce(
            selected_logits(tiny_model, hidden_states(tiny_model, b.input_ids, b.attention_mask), mask),
            b.labels[:, 1:][mask],
        ).mean()
        reference = tiny_model(input_ids=b.input_ids, labels=b.labels).loss
        # Changing a prompt token's label to something else must not matter: only response labels count.
        everything = tiny_model(input_ids=b.input_ids, labels=b.input_ids).loss
    assert float(ours) == pytest.approx(float(reference), rel=1e-4)
    assert float(everything) != pytest.approx(float(reference), rel=1e-3)
    assert (b.labels[0, : len(enc) - enc.n_target] == IGNORE_INDEX).all()


def test_per_row_mean() -> None:
    values = torch.tensor([1.0, 3.0, 10.0])
    rows = torch.tensor([0, 0, 2])
    assert per_row_mean(values, rows, 3).tolist() == [2.0, 0.0, 10.0]


def test_topk_kl_is_zero_against_itself_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    base = torch.randn(5, 50)
    ids, lp = topk_logprobs(base, 8)
    assert topk_kl(base, ids, lp).abs().max() < 1e-5
    other = base + torch.randn(5, 50)
    assert (topk_kl(other, ids, lp) > 0).all()
    # With k = vocabulary size it is the exact KL divergence.
    ids_all, lp_all = topk_logprobs(base, 50)
    exact = torch.nn.functional.kl_div(
        torch.log_softmax(other, -1), torch.log_softmax(base, -1), log_target=True, reduction="none"
    ).sum(-1)
    torch.testing.assert_close(topk_kl(other, ids_all, lp_all), exact, rtol=1e-3, atol=1e-4)
