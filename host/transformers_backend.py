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

from host.backend import Sequence
from learning.formatting import ensure_chat_template
from learning.generate import generate_ids
from learning.model_loading import ensure_base_model, load_base, model_device, setup_threads
from train_worker.settings import Settings

log = logging.getLogger(__name__)


class TransformersBackend:
    name = "transformers"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.tokenizer: Any = None
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

    def generate(self, kernel: str | None, sequences: list[Sequence]) -> None:
        budget = max(s.max_new_tokens for s in sequences)
        prompts = [s.prompt_ids for s in sequences]
        name = self._adapters.get(kernel) if kernel is not None else None
        if name is None:
            if self._model is not None:
                with self._model.disable_adapter():
                    outputs = generate_ids(self._model, self.tokenizer, prompts, max_new_tokens=budget)
            else:
                outputs = generate_ids(self._base, self.tokenizer, prompts, max_new_tokens=budget)
        else:
            assert self._model is not None
            self._model.set_adapter(name)
            outputs = generate_ids(self._model, self.tokenizer, prompts, max_new_tokens=budget)
        for sequence, tokens in zip(sequences, outputs, strict=True):
            for token in tokens:
                if not sequence.emit(token):
                    break
