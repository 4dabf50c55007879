"""Scoring primitives: answer normalisation, key-answer containment, token F1, and perplexity."""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from learning import interrupt
from learning.losses import decoder_and_head
from learning.model_loading import model_device

_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> list[str]:
    """Lower-cased words with punctuation removed and unicode folded (no article stripping)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _PUNCT.sub(" ", text).split()


def contains(answer: str, key: str) -> bool:
    """True when the normalised key appears in the normalised answer as a whole-word sequence."""
    words, keys = normalise(answer), normalise(key)
    if not keys:
        return False
    n = len(keys)
    return any(words[i : i + n] == keys for i in range(len(words) - n + 1))


def contains_any(answer: str, keys: Sequence[str]) -> bool:
    """`contains` for any of several accepted answers."""
    return any(contains(answer, k) for k in keys)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 between normalised texts (1.0 when both are empty)."""
    pred, ref = normalise(prediction), normalise(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


@torch.inference_mode()
def perplexity(model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, window: int = 512) -> float:
    """Perplexity of plain `text` in non-overlapping windows (the first token of each window is context)."""
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder, head = decoder_and_head(model)
    device = model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(ids) - 1, window):
            interrupt.check()
            chunk = torch.tensor([ids[start : start + window + 1]], device=device)
            if chunk.shape[1] < 2:
                break
            hidden = decoder(input_ids=chunk[:, :-1], use_cache=False).last_hidden_state
            logits = head(hidden[0])
            nll = torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum")
            total += float(nll)
            count += chunk.shape[1] - 1
    finally:
        model.train(was_training)
    return math.exp(total / max(count, 1))
