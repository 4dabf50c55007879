"""Neighbour anchors: each new prompt with its novel words removed, answered by the base model.

A small model taught "The sky on Orrin is violet" also starts saying the sky on a clear day is
violet: it learns the relation, not the subject. The words of a new prompt that the base model finds
most surprising are, almost always, the new subject ("Orrin"). Removing them gives a neighbouring
prompt ("What color is the sky on the planet?") whose base answer is kept by KL during training, so
the adapter must tie the new answer to the new subject (locality, as in knowledge-editing work).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from learning import interrupt
from learning.anchors import TRAIN_ANCHOR_TOKENS, Anchor
from learning.examples import Example
from learning.formatting import encode_prompt
from learning.generate import decode, finished, generate_ids
from learning.losses import decoder_and_head
from learning.model_loading import model_device

_WORD = re.compile(r"[\w'\u2019-]+")
# Words scoring at least this share of the most surprising word are removed with it.
SURPRISE_SHARE = 0.5


def word_surprisals(model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[int, int, float]]:
    """(start, end, surprisal in nats) per word: the summed -log p of its tokens under the model."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    offsets: list[tuple[int, int]] = enc["offset_mapping"]
    words = [(m.start(), m.end(), 0.0) for m in _WORD.finditer(text)]
    if len(ids) < 2 or not words:
        return words
    decoder, head = decoder_and_head(model)
    tokens = torch.tensor([ids], device=model_device(model))
    with torch.no_grad():
        hidden = decoder(input_ids=tokens, use_cache=False).last_hidden_state[0, :-1]
        logp = torch.log_softmax(head(hidden), dim=-1)
        token_nll = (-logp.gather(-1, tokens[0, 1:].unsqueeze(-1))).squeeze(-1).tolist()
    scores = [0.0] * len(words)
    for (start, end), nll in zip(offsets[1:], token_nll, strict=True):
        for w, (ws, we, _) in enumerate(words):
            if start < we and end > ws:  # the token overlaps the word (its span may include a leading space)
                scores[w] += nll
                break
    return [(s, e, score) for (s, e, _), score in zip(words, scores, strict=True)]


def ablate(text: str, words: Sequence[tuple[int, int, float]], share: float = SURPRISE_SHARE) -> str | None:
    """`text` without its most surprising word and the adjacent words scoring at least `share` of it.

    The first word is never removed (it has no context, so its surprisal means nothing). Only the one
    contiguous run around the peak goes, which keeps the question's relation ("capital of") intact.
    """
    candidates = list(words[1:])
    if not candidates:
        return None
    peak = max(range(len(candidates)), key=lambda i: candidates[i][2])
    top = candidates[peak][2]
    if top <= 0:
        return None
    first = last = peak
    while first > 0 and candidates[first - 1][2] >= share * top:
        first -= 1
    while last + 1 < len(candidates) and candidates[last + 1][2] >= share * top:
        last += 1
    out = [text[: candidates[first][0]].rstrip(" "), text[candidates[last][1] :]]
    ablated = re.sub(r"\s+([?.!,])", r"\1", " ".join(p for p in out if p).strip())
    ablated = re.sub(r"\s{2,}", " ", ablated)
    return ablated if ablated and ablated != text else None


@torch.no_grad()
def neighbour_anchors(model: nn.Module, tokenizer: PreTrainedTokenizerBase, new: Sequence[Example]) -> list[Anchor]:
    """One base-answered neighbour prompt per new example (deterministic: fixed order and batching)."""
    was_training = model.training
    model.train(False)
    try:
        context = model.disable_adapter() if isinstance(model, PeftModel) else torch.no_grad()
        with context:
            prompts: list[tuple[Example, str]] = []
            for e in new:
                interrupt.check()
                ablated = ablate(e.prompt, word_surprisals(model, tokenizer, e.prompt))
                if ablated is not None:
                    prompts.append((e, ablated))
            encoded = [encode_prompt(tokenizer, p, e.system) for e, p in prompts]
            outputs = generate_ids(
                model, tokenizer, encoded, max_new_tokens=TRAIN_ANCHOR_TOKENS, batch_size=len(encoded) or 1
            )
    finally:
        model.train(was_training)
    anchors = []
    for (e, prompt), tokens in zip(prompts, outputs, strict=True):
        answer = decode(tokenizer, tokens)
        if answer:
            example = Example(id=f"neighbour:{e.id}", prompt=prompt, response=answer, system=e.system)
            anchors.append(Anchor(example=example, finished=finished(tokens, tokenizer)))
    return anchors
