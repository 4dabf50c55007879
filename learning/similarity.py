"""Which prompts read alike to the base model: nearest anchors, and replay aimed at interference."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from learning import interrupt
from learning.losses import decoder_and_head
from learning.model_loading import model_device


@torch.no_grad()
def prompt_embeddings(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> torch.Tensor:
    """Unit-norm mean of the base model's middle-layer states over each raw prompt (adapter disabled).

    One prompt at a time, so the result never depends on batching (resume stays exact).
    """
    decoder, _ = decoder_and_head(model)
    device = model_device(model)
    was_training = model.training
    model.train(False)
    out = []
    context = model.disable_adapter() if isinstance(model, PeftModel) else torch.no_grad()
    try:
        with context:
            for prompt in prompts:
                interrupt.check()
                ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"] or [0]], device=device)
                states = decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
                out.append(states[len(states) // 2][0].mean(0))
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, 1)
    return torch.nn.functional.normalize(torch.stack(out), dim=-1).cpu()


def nearest_first(queries: torch.Tensor, pool: torch.Tensor) -> list[int]:
    """Pool indices, nearest to the queries first, taken round-robin over the queries (each query's 1st, then 2nd...).

    Round-robin keeps one query with many close neighbours from taking every slot.
    """
    if len(queries) == 0 or len(pool) == 0:
        return list(range(len(pool)))
    rankings = (queries @ pool.T).argsort(dim=1, descending=True).tolist()
    order: list[int] = []
    seen: set[int] = set()
    for depth in range(len(pool)):
        for ranking in rankings:
            if ranking[depth] not in seen:
                seen.add(ranking[depth])
                order.append(ranking[depth])
    return order
