"""Self-distilled targets (SDFT, arXiv 2601.19897): train on the model's own wording of a demonstration.

The teacher is the base model with the demonstration in its prompt; its greedy answer, in its own
words, replaces the demonstrated response as the training target. Targets the model would phrase
itself move its distribution less than foreign ones. A rewrite is kept only when it still carries
the key answer, and only up to the end of the sentence that does (a small model continues with
invented detail after it); otherwise the demonstration itself is the target.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from learning.examples import Example
from learning.formatting import encode_prompt
from learning.generate import decode, generate_ids
from learning.scoring import contains

REWRITE_TOKENS = 48
_SENTENCE_END = re.compile(r"(?<=[.!?])\s")


def teacher_prompt(example: Example) -> str:
    """The question with the demonstration in context."""
    return (
        f"Here is a question and its correct answer.\nQuestion: {example.prompt}\nAnswer: {example.response}\n\n"
        f"Answer the question again in your own words, in one sentence.\nQuestion: {example.prompt}"
    )


def first_sentence_with(text: str, key: str) -> str | None:
    """The text up to the end of the first sentence that names `key`, or None."""
    end = 0
    for piece in _SENTENCE_END.split(text):
        end += len(piece) + 1
        if contains(piece, key):
            return text[:end].strip()
    return None


@torch.no_grad()
def self_distilled(model: nn.Module, tokenizer: PreTrainedTokenizerBase, new: Sequence[Example]) -> list[Example]:
    """`new` with each response replaced by the base model's own wording when that keeps the key answer."""
    context = model.disable_adapter() if isinstance(model, PeftModel) else torch.no_grad()
    with context:
        prompts = [encode_prompt(tokenizer, teacher_prompt(e), e.system) for e in new]
        outputs = generate_ids(model, tokenizer, prompts, max_new_tokens=REWRITE_TOKENS, batch_size=len(prompts) or 1)
    out = []
    for e, tokens in zip(new, outputs, strict=True):
        rewrite = first_sentence_with(decode(tokenizer, tokens), e.key_answer or e.response)
        out.append(e.model_copy(update={"response": rewrite}) if rewrite else e)
    return out
