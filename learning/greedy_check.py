"""Does greedy decoding reproduce a known answer? One teacher-forced pass decides, for a whole batch.

Greedy decoding picks the argmax token at every step. If, with the known answer fed in, the argmax at
each answer position is the answer's own next token, greedy decoding from the prompt produces exactly
that answer: no token needs to be generated to know it. Evaluation is mostly "is this still answered
the way it was": earlier facts, the base model's probe answers, canary facts. One forward pass over
prompt + answer (with the shared chat prefix run once) settles all of those that still match, and
only the ones that do not are generated. That keeps evaluation of hundreds of items in seconds.

The verdict is exact in exact arithmetic; batched teacher forcing and step-by-step decoding round
differently, so a near-tie can go either way (about as often as between two batch sizes of `generate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from learning import interrupt
from learning.batching import collate
from learning.formatting import IGNORE_INDEX, Encoded
from learning.generate import decode, generate_ids
from learning.losses import hidden_states, per_row_mean, selected_logits, target_mask, token_ce
from learning.model_loading import model_device

CHECK_BATCH = 32


@dataclass(frozen=True)
class Check:
    """One teacher-forced check of an expected answer."""

    reproduced: bool  # greedy decoding gives exactly this answer
    loss: float  # mean cross-entropy of its tokens
    agreement: float  # share of its tokens that are the model's argmax


@torch.inference_mode()
def follows(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    *,
    batch_size: int = CHECK_BATCH,
) -> list[Check]:
    """Per (prompt, target): whether greedy decoding reproduces `target`, its mean CE, and its token agreement.

    An empty target trivially "follows". Rows are sorted by length so batches carry little padding.
    """
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    device = model_device(model)
    encoded = [
        Encoded(input_ids=[*p, *t], labels=[IGNORE_INDEX] * len(p) + list(t))
        for p, t in zip(prompts, targets, strict=True)
    ]
    order = sorted((i for i in range(len(encoded)) if targets[i]), key=lambda i: len(encoded[i]))
    checks = [Check(True, 0.0, 1.0)] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            interrupt.check()
            rows = order[start : start + batch_size]
            batch = collate([encoded[i] for i in rows], rows, pad_id).to(device)
            mask = target_mask(batch.labels)
            hidden = hidden_states(model, batch.input_ids, batch.attention_mask)
            logits = selected_logits(model, hidden, mask)
            wanted = batch.labels[:, 1:][mask]
            row_of = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(mask)[mask]
            wrong = per_row_mean((logits.argmax(-1) != wanted).float(), row_of, len(rows))
            ce = per_row_mean(token_ce(logits.float(), wanted), row_of, len(rows))
            for r, i in enumerate(rows):
                checks[i] = Check(bool(wrong[r] == 0), float(ce[r]), 1.0 - float(wrong[r]))
    finally:
        model.train(was_training)
    return checks


@dataclass(frozen=True)
class Ask:
    """One question: its encoded prompt, the answer it is expected to reproduce, and how to generate otherwise."""

    prompt: list[int]
    expected: list[int] = field(default_factory=list)
    budget: int = 32
    named: Callable[[str], bool] | None = None  # stop generating once this holds for the decoded answer


@dataclass(frozen=True)
class Reply:
    text: str
    reproduced: bool  # the expected answer, settled by teacher forcing without generating


def ask(model: nn.Module, tokenizer: PreTrainedTokenizerBase, asks: Sequence[Ask]) -> list[Reply]:
    """Greedy replies: expected answers confirmed in one teacher-forced pass, the others generated."""
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    checked = [i for i, a in enumerate(asks) if a.expected]
    checks = follows(model, [asks[i].prompt for i in checked], [asks[i].expected for i in checked], pad)
    replies: list[Reply | None] = [None] * len(asks)
    for i, check in zip(checked, checks, strict=True):
        if check.reproduced:
            replies[i] = Reply(text=decode(tokenizer, asks[i].expected), reproduced=True)
    rest = [i for i, r in enumerate(replies) if r is None]
    if rest:

        def stop(j: int, tokens: list[int]) -> bool:
            named = asks[rest[j]].named
            return named is not None and named(decode(tokenizer, tokens))

        stops = any(asks[i].named is not None for i in rest)
        outputs = generate_ids(
            model,
            tokenizer,
            [asks[i].prompt for i in rest],
            max_new_tokens=[asks[i].budget for i in rest],
            batch_size=CHECK_BATCH,
            stop=stop if stops else None,
        )
        for i, tokens in zip(rest, outputs, strict=True):
            replies[i] = Reply(text=decode(tokenizer, tokens), reproduced=False)
    return [r for r in replies if r is not None]
