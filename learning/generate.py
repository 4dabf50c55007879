"""Batched greedy generation with left padding, shared by evaluation and the model host."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from learning import interrupt
from learning.formatting import encode_prompt
from learning.model_loading import model_device

StopWhen = Callable[[int, list[int]], bool]


class _RowStop(StoppingCriteria):
    """Ends each row as soon as `stop(index, tokens so far)` says so (the key answer has appeared)."""

    def __init__(self, rows: Sequence[int], width: int, stop: StopWhen) -> None:
        self.rows, self.width, self.stop = list(rows), width, stop
        self.length: list[int | None] = [None] * len(rows)  # tokens generated when the row stopped

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for r, index in enumerate(self.rows):
            if self.length[r] is None and self.stop(index, input_ids[r, self.width :].tolist()):
                self.length[r] = input_ids.shape[1] - self.width
        return cast(torch.BoolTensor, torch.tensor([n is not None for n in self.length], device=input_ids.device))


class _StopOnRequest(StoppingCriteria):
    """Ends a generation within one token once a stop is requested (learning.interrupt)."""

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        stop = interrupt.requested() is not None
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 64,
    batch_size: int = 16,
    stop: StopWhen | None = None,
) -> list[list[int]]:
    """Greedy continuations of already-encoded prompts, stopping at eos; eos and padding are stripped.

    Prompts are batched by token budget, then length (decoding is memory-bound, so batching is nearly
    free), and returned in the input order. `max_new_tokens` may be one budget per prompt; `stop(i,
    tokens)` may end prompt i early (its tokens then end where the stop fired).
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], len(prompts[i])))
    out: list[list[int]] = [[] for _ in prompts]
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            interrupt.check()
            idx = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(prompts[i])
                ids[row, width - n :] = torch.tensor(list(prompts[i]))
                mask[row, width - n :] = 1
            criteria = _RowStop(idx, width, stop) if stop is not None else None
            generated = cast(Any, model).generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max(budgets[i] for i in idx),
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                stopping_criteria=StoppingCriteriaList([_StopOnRequest(), *([criteria] if criteria else [])]),
            )
            interrupt.check()  # a stop cut this batch short: its answers are not to be used
            for row, i in enumerate(idx):
                tokens = generated[row, width:].tolist()[: budgets[i]]
                stopped = criteria.length[row] if criteria is not None else None
                if stopped is not None and (eos not in tokens or tokens.index(eos) >= stopped):
                    tokens = tokens[:stopped]  # a stopped row is padded until its batch ends
                elif eos in tokens:
                    tokens = tokens[: tokens.index(eos) + 1]
                out[i] = tokens
    finally:
        model.train(was_training)
    return out


def finished(tokens: Sequence[int], tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when a generation ended with eos rather than at the token limit."""
    return bool(tokens) and tokens[-1] == tokenizer.eos_token_id


def decode(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[int]) -> str:
    """Text of generated tokens without special tokens, stripped."""
    text = tokenizer.decode(list(tokens), skip_special_tokens=True)
    return str(text).strip()


def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> list[str]:
    """Greedy answers to chat prompts, formatted exactly as in training."""
    encoded = [encode_prompt(tokenizer, p, system) for p in prompts]
    ids = generate_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [decode(tokenizer, t) for t in ids]
