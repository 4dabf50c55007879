"""Loss math as plain functions over tensors: response-only logits, per-row CE, top-k KL to the base."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from learning.formatting import IGNORE_INDEX


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The transformer body and the output projection of a (possibly peft-wrapped) causal LM."""
    inner: Any = model.get_base_model() if isinstance(model, PeftModel) else model
    decoder: nn.Module = inner.get_decoder()
    head: nn.Module = inner.get_output_embeddings()
    return decoder, head


MIN_SHARED_PREFIX = 8


def common_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """Length of the token prefix that every row shares (real tokens only; rows are right-padded)."""
    shortest = int(attention_mask.sum(1).min())
    same = (input_ids[:, :shortest] == input_ids[:1, :shortest]).all(0)
    differs = (~same).nonzero()
    return int(differs[0]) if len(differs) else shortest


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, share_prefix: bool = True
) -> torch.Tensor:
    """Last hidden states [B, T, H], without computing logits for every position.

    Chat-formatted rows start with the same template and system prompt (about 40% of a short example).
    That shared prefix is run once, its key/value cache repeated for every row, and only the suffixes
    are run as a batch; gradients flow back through the shared cache. Same numbers, fewer FLOPs.
    """
    decoder, _ = decoder_and_head(model)
    rows, width = input_ids.shape
    shared = min(common_prefix_length(input_ids, attention_mask), width - 1) if share_prefix and rows > 1 else 0
    if shared < MIN_SHARED_PREFIX:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden: torch.Tensor = out.last_hidden_state
        return hidden
    prefix = decoder(input_ids=input_ids[:1, :shared], use_cache=True)
    cache = prefix.past_key_values
    cache.batch_repeat_interleave(rows)
    suffix = decoder(
        input_ids=input_ids[:, shared:], attention_mask=attention_mask, past_key_values=cache, use_cache=True
    )
    return torch.cat([prefix.last_hidden_state.expand(rows, -1, -1), suffix.last_hidden_state], dim=1)


def selected_logits(model: nn.Module, hidden: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Logits [N, V] at the positions where `select` [B, T-1] is true; position t predicts token t+1.

    The output projection over a large vocabulary is the costliest single matmul of a small model;
    applying it only where a loss is taken skips the prompt positions entirely.
    """
    _, head = decoder_and_head(model)
    logits: torch.Tensor = head(hidden[:, :-1][select])
    return logits


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] true where the next token is a training target."""
    return labels[:, 1:] != IGNORE_INDEX


def per_row_mean(values: torch.Tensor, row_of: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of `values` [N] grouped by `row_of` [N]; rows with no values get 0."""
    sums = values.new_zeros(n_rows).index_add(0, row_of, values)
    counts = values.new_zeros(n_rows).index_add(0, row_of, torch.ones_like(values))
    return sums / counts.clamp(min=1)


def token_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per position [N]."""
    return F.cross_entropy(logits, targets, reduction="none")


def topk_kl(logits: torch.Tensor, base_ids: torch.Tensor, base_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_model) per position [N] over the base's top-k tokens plus one bucket for the rest.

    Coarsening to k+1 outcomes keeps the base targets tiny to cache while still a true KL divergence.
    """
    logp = torch.log_softmax(logits, dim=-1)
    model_top = logp.gather(-1, base_ids)
    base_tail = torch.log1p(-base_logprobs.exp().sum(-1).clamp(max=1 - 1e-6))
    model_tail = torch.log1p(-model_top.exp().sum(-1).clamp(max=1 - 1e-6))
    base_p = base_logprobs.exp()
    kl_top = (base_p * (base_logprobs - model_top)).sum(-1)
    kl_tail = base_tail.exp() * (base_tail - model_tail)
    return kl_top + kl_tail


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely token ids and their log-probabilities, per position."""
    logp = torch.log_softmax(logits, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return ids, values
