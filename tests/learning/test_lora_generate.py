from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from learning import lora
from learning.config import AdapterSettings
from learning.formatting import encode_prompt
from learning.generate import generate, generate_ids


def test_a_fresh_adapter_starts_as_the_identity(tiny_model: PreTrainedModel) -> None:
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = tiny_model(input_ids=ids).logits
        model = lora.attach_new(tiny_model, AdapterSettings(rank=4, alpha=8))
        after = model(input_ids=ids).logits
    torch.testing.assert_close(before, after)
    params = lora.trainable_params(model)
    assert params and all("lora_" in k and ".default." not in k for k in params)


def test_save_and_continue_keeps_the_weights(tiny_model: PreTrainedModel, tmp_path: Path) -> None:
    model = lora.attach_new(tiny_model, AdapterSettings(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in lora.trainable_params(model).values():
            p.add_(torch.randn_like(p))
    state = lora.adapter_state(model)
    lora.save_adapter(model, tmp_path / "v1")
    assert (tmp_path / "v1" / lora.ADAPTER_FILE).is_file()
    base = model.unload()
    continued = lora.attach(base, AdapterSettings(rank=16), tmp_path / "v1")
    params = lora.trainable_params(continued)
    assert params.keys() == state.keys()
    assert all(torch.equal(params[k].detach(), state[k]) for k in state)
    assert all(p.requires_grad for p in params.values())


def test_batched_left_padded_generation_equals_one_by_one(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    prompts = [encode_prompt(tokenizer, p) for p in ["a", "a much longer prompt here", "mid size"]]
    batched = generate_ids(tiny_model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [generate_ids(tiny_model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(0 < len(t) <= 6 for t in batched)


def test_generation_stops_at_eos(tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # make eos very likely, so it comes within a few tokens
        tiny_model.lm_head.weight[eos] *= 50.0
    out = generate_ids(tiny_model, tokenizer, [encode_prompt(tokenizer, "x")], max_new_tokens=32)
    assert len(out[0]) < 32 and out[0][-1] == eos and out[0].count(eos) == 1
    assert "<|im_end|>" not in generate(tiny_model, tokenizer, ["x"], max_new_tokens=32)[0]
