"""The reference backend: the base in fp32 with transformers, each kernel's adapter resident in peft.

Each kernel's adapter stays resident under its own peft adapter name; switching kernels is a
`set_adapter`. A new version of the same shape is copied into place (`hotswap_adapter`); one of
another shape is loaded beside and the old one dropped. The base is never reloaded for a deploy.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils.hotswap import hotswap_adapter
from transformers import DynamicCache

from host.backend import Admit, Sequence
from host.sampling import pick
from learning.formatting import ensure_chat_template
from learning.model_loading import ensure_base_model, load_base, model_device, setup_threads
from train_worker.settings import Settings

log = logging.getLogger(__name__)


class TransformersBackend:
    name = "transformers"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokenizer: Any = None
        self.context_length = 0
        self._base: Any = None
        self._model: PeftModel | None = None
        self._adapters: dict[str, str] = {}  # kernel -> peft adapter name
        self._threads_set = False

    def load(self) -> str:
        if not self._threads_set:  # on the engine thread, which runs every torch call
            setup_threads(self.settings.torch_threads)
            self._threads_set = True
        model_dir = ensure_base_model(self.settings.base_model, self.settings.layout.models)
        self._base, self.tokenizer = load_base(model_dir, self.settings.device)
        ensure_chat_template(self.tokenizer)
        self.context_length = int(getattr(self._base.config, "max_position_embeddings", 2048))
        self._model = None
        self._adapters.clear()
        return model_dir.name

    def unload(self) -> None:
        self._model = None
        self._base = None
        self._adapters.clear()
        gc.collect()
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.empty_cache()  # give the cached GPU memory back, for the training run

    def attach(self, kernel: str, version: int, folder: Path) -> str:
        name = "k_" + kernel.replace("-", "_")  # one peft adapter per kernel; versions replace its weights
        device = str(model_device(self._base))  # adapter weights load straight onto the base's device
        if kernel in self._adapters and self._model is not None:
            try:
                # Same shape as the resident version (the usual case: a run continues the last one):
                # copy the new weights into place, no new modules, no base reload.
                hotswap_adapter(self._model, str(folder), adapter_name=name, torch_device=device)
                return "hot-swapped"
            except (RuntimeError, ValueError) as exc:
                log.info("kernel %s: v%d cannot be hot-swapped (%s); loading it beside", kernel, version, exc)
                self.detach(kernel)
        if self._model is None:
            self._model = PeftModel.from_pretrained(
                self._base, str(folder), adapter_name=name, is_trainable=False, torch_device=device
            )
        else:
            self._model.load_adapter(str(folder), adapter_name=name, is_trainable=False, torch_device=device)
        self._adapters[kernel] = name
        return "loaded"

    def detach(self, kernel: str) -> None:
        name = self._adapters.pop(kernel)
        assert self._model is not None
        remaining = list(self._adapters.values())
        if remaining:
            self._model.set_adapter(remaining[0])
            self._model.delete_adapter(name)
        else:
            # peft keeps pointing at a deleted last adapter; strip the LoRA layers off the base instead.
            self._base = self._model.unload()
            self._model = None

    def generate(self, kernel: str | None, sequences: list[Sequence], admit: Admit) -> None:
        name = self._adapters.get(kernel) if kernel is not None else None
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if name is None:
            if self._model is not None:
                with self._model.disable_adapter():
                    decode_batch(self._model, sequences, pad)
            else:
                decode_batch(self._base, sequences, pad)
        else:
            assert self._model is not None
            self._model.set_adapter(name)
            decode_batch(self._model, sequences, pad)


@torch.inference_mode()
def decode_batch(model: Any, sequences: list[Sequence], pad: int) -> None:
    """Decode every sequence step by step in one left-padded batch with a KV cache, the way transformers'
    `generate` does (same positions, masks and last-token logits, so greedy answers are identical), but
    with a sampler of its own per row and rows that leave the batch as soon as they end."""
    device = model_device(model)
    width = max(len(s.prompt_ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, width - len(sequence.prompt_ids) :] = torch.tensor(sequence.prompt_ids)
        mask[row, width - len(sequence.prompt_ids) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=1)
    live = list(range(len(sequences)))  # indices into `sequences` of the rows still in the batch
    counts = [0] * len(sequences)
    next_positions = positions[:, -1:] + 1
    while True:
        logits = out.logits[:, -1, :].float().cpu().numpy()
        tokens, keep = [], []
        for row, index in enumerate(live):
            sequence = sequences[index]
            token = pick(logits[row], sequence.sampling, sequence.rng)
            counts[index] += 1
            if sequence.emit(token) and counts[index] < sequence.max_new_tokens:
                tokens.append(token)
                keep.append(row)
        if not keep:
            return
        if len(keep) < len(live):  # finished rows leave the batch, cache and all
            rows = torch.tensor(keep, device=device)
            cache.batch_select_indices(rows)
            mask, next_positions = mask[rows], next_positions[rows]
            live = [live[row] for row in keep]
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        step = torch.tensor(tokens, device=device).unsqueeze(1)
        out = model(input_ids=step, attention_mask=mask, position_ids=next_positions, past_key_values=cache)
        next_positions = next_positions + 1
