"""LoRA adapters: attach a fresh one, continue a saved one, read and write its trainable state."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedModel

from learning.config import AdapterSettings
from learning.fsutil import atomic_dir
from learning.model_loading import model_device

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
ADAPTER_FILE = "adapter_model.safetensors"


def lora_config(settings: AdapterSettings) -> LoraConfig:
    """peft's config for our adapter settings."""
    return LoraConfig(
        r=settings.rank,
        lora_alpha=cast(int, settings.alpha),  # peft annotates int but scales by any number
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        use_rslora=settings.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_new(model: PreTrainedModel, settings: AdapterSettings, seed: int = 0) -> PeftModel:
    """Wrap the base in a freshly initialised adapter (B = 0, so it starts as the identity)."""
    torch.manual_seed(seed)
    peft_model: PeftModel = get_peft_model(model, lora_config(settings), adapter_name=ADAPTER_NAME)
    return peft_model


def attach_saved(model: PreTrainedModel, adapter_dir: Path, *, trainable: bool = True) -> PeftModel:
    """Wrap the base in a saved adapter, to continue training it (cumulative learning) or to serve it."""
    peft_model: PeftModel = PeftModel.from_pretrained(
        model,
        str(adapter_dir),
        adapter_name=ADAPTER_NAME,
        is_trainable=trainable,
        torch_device=str(model_device(model)),
    )
    return peft_model


def attach(model: PreTrainedModel, settings: AdapterSettings, previous: Path | None, seed: int = 0) -> PeftModel:
    """Continue `previous` when given (its own shape wins over `settings`), else start a fresh adapter."""
    if previous is None:
        return attach_new(model, settings, seed)
    peft_model = attach_saved(model, previous)
    cfg = cast(LoraConfig, peft_model.peft_config[ADAPTER_NAME])
    if cfg.r != settings.rank or cfg.lora_alpha != settings.alpha:
        log.warning(
            "continuing the previous adapter (r=%s, alpha=%s); its shape wins over the requested r=%s, alpha=%s",
            cfg.r,
            cfg.lora_alpha,
            settings.rank,
            settings.alpha,
        )
    return peft_model


def state_key(param_name: str) -> str:
    """The saved-adapter key of a live parameter name (peft drops the adapter name when saving)."""
    return param_name.replace(f".{ADAPTER_NAME}.", ".")


def trainable_params(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable parameters, keyed as in the saved adapter file."""
    return {state_key(n): p for n, p in model.named_parameters() if p.requires_grad}


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter weights, keyed as in the saved adapter file."""
    state: dict[str, torch.Tensor] = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {k: v.detach().clone() for k, v in state.items()}


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter weights in place."""
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise ValueError(f"adapter state is missing {len(missing)} LoRA tensors, e.g. {missing[0]}")


def save_adapter(model: PeftModel, out_dir: Path) -> Path:
    """Save the adapter (config + safetensors) to `out_dir` atomically, replacing what was there."""
    with atomic_dir(out_dir, replace=True) as tmp:
        write_adapter(model, tmp)
    return out_dir


def write_adapter(model: PeftModel, directory: Path) -> None:
    """peft's adapter files (config + safetensors) into an existing directory, without its model card."""
    model.save_pretrained(str(directory), safe_serialization=True)
    (directory / "README.md").unlink(missing_ok=True)
