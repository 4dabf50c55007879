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


def test_shared_prefix_gives_the_same_states_and_gradients(tokenizer: PreTrainedTokenizerFast) -> None:
    from learning import lora
    from learning.config import AdapterSettings
    from learning.losses import common_prefix_length
    from tests.learning.conftest import make_model

    items = [encode_example(tokenizer, Example(id=str(i), prompt="q" * (i + 1), response="ans " * (i + 1)), 128)
             for i in range(3)]  # fmt: skip
    b = collate(items, range(3), tokenizer.pad_token_id)
    assert common_prefix_length(b.input_ids, b.attention_mask) >= 20  # template + default system prompt
    results = []
    for share in (False, True):
        model = lora.attach_new(make_model(tokenizer), AdapterSettings(rank=4, alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for p in lora.trainable_params(model).values():
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
        mask = target_mask(b.labels)
        hidden = hidden_states(model, b.input_ids, b.attention_mask, share_prefix=share)
        loss = token_ce(selected_logits(model, hidden, mask), b.labels[:, 1:][mask]).mean()
        torch.autograd.backward(loss)
        grads = {k: p.grad.clone() for k, p in lora.trainable_params(model).items() if p.grad is not None}
        results.append((hidden.detach(), float(loss), grads))
    (h0, l0, g0), (h1, l1, g1) = results
    real = b.attention_mask.bool()
    torch.testing.assert_close(h1[real], h0[real], rtol=1e-4, atol=1e-5)
    assert l1 == pytest.approx(l0, rel=1e-5)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-3, atol=1e-6, msg=k)
