from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from learning.examples import Example
from learning.formatting import IGNORE_INDEX, encode_example, encode_prompt


def test_labels_cover_only_the_response_and_its_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    e = Example(id="a", prompt="Code 7?", response="It is zub.")
    enc = encode_example(tokenizer, e, 512)
    prompt = encode_prompt(tokenizer, e.prompt, e.system)
    assert enc.input_ids[: len(prompt)] == prompt
    assert all(t == IGNORE_INDEX for t in enc.labels[: len(prompt)])
    target = [t for t in enc.labels if t != IGNORE_INDEX]
    assert target == enc.input_ids[len(prompt) :]
    assert target[-1] == tokenizer.eos_token_id
    # The template's newline after <|im_end|> is neither input nor target.
    assert tokenizer.decode(target, skip_special_tokens=True) == "It is zub."


def test_default_system_prompt_is_the_templates_and_consistent(tokenizer: PreTrainedTokenizerFast) -> None:
    text = str(tokenizer.decode(encode_prompt(tokenizer, "hi", None)))
    assert "Be brief." in text
    assert text.endswith("<|im_start|>assistant\n")
    custom = str(tokenizer.decode(encode_prompt(tokenizer, "hi", "Answer in French.")))
    assert "Answer in French." in custom and "Be brief." not in custom
    enc = encode_example(tokenizer, Example(id="a", prompt="hi", response="yo", system="Answer in French."), 512)
    assert str(tokenizer.decode(enc.input_ids)).startswith(custom)


def test_unfinished_responses_get_no_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    e = Example(id="a", prompt="Tell me", response="a long story that was cut")
    enc = encode_example(tokenizer, e, 512, end_with_eos=False)
    assert enc.labels[-1] != tokenizer.eos_token_id
    assert tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX]) == e.response


def test_truncation_keeps_the_response(tokenizer: PreTrainedTokenizerFast) -> None:
    e = Example(id="a", prompt="x" * 300, response="short answer")
    enc = encode_example(tokenizer, e, 64)
    assert len(enc) == 64
    assert tokenizer.decode([t for t in enc.labels if t != IGNORE_INDEX], skip_special_tokens=True) == "short answer"


def test_empty_response_is_refused(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="empty response"):
        encode_example(tokenizer, Example(id="a", prompt="x", response=""), 64, end_with_eos=False)
