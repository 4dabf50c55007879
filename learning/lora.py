"""LoRA adapters: attach a fresh one, continue or grow a saved one, read and write its trainable state.

Growing (`attach_grown`): a run appends `grow_rank` fresh rows to the deployed adapter's rank and
freezes the rows earlier versions trained, so this run's update is a separate term `B_new A_new`
that the trainer can constrain (null-space projection) without touching what earlier runs wrote.
The result is still one ordinary peft LoRA adapter (of rank r_prev + grow_rank), which every
serving path loads as it is. When the rank would pass `max_rank`, the earlier rows are first
compacted by a truncated SVD of their product.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
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
        layers_to_transform=settings.layers,
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


def attach_grown(
    model: PreTrainedModel,
    settings: AdapterSettings,
    previous: Path | None,
    grow_rank: int,
    max_rank: int,
    seed: int = 0,
) -> tuple[PeftModel, int]:
    """A fresh adapter of rank r_prev + grow_rank whose first r_prev rows are `previous`, frozen; (model, r_prev).

    The scale `alpha / rank` of `settings` is kept for the whole adapter; earlier rows are rescaled to it.
    """
    if settings.use_rslora:
        raise ValueError("growing adapters scale by alpha/rank; use_rslora is not supported with adapter_mode='grow'")
    scale = settings.alpha / settings.rank
    if previous is None:
        fresh = settings.model_copy(update={"rank": grow_rank, "alpha": scale * grow_rank})
        return attach_new(model, fresh, seed), 0
    prev_cfg = LoraConfig.from_pretrained(str(previous))
    if prev_cfg.use_rslora:
        raise ValueError(f"{previous} was trained with use_rslora; it cannot be grown")
    prev_state = load_file(str(previous / ADAPTER_FILE))
    prev_scale = float(prev_cfg.lora_alpha) / prev_cfg.r
    prev_rank = prev_cfg.r
    if prev_rank + grow_rank > max_rank:
        target = max(max_rank - grow_rank, 1)
        log.info("compacting the previous adapter from rank %d to %d", prev_rank, target)
        prev_state = compact(prev_state, target)
        prev_rank = target
    total = prev_rank + grow_rank
    targets = prev_cfg.target_modules
    grown = settings.model_copy(
        update={
            "rank": total,
            "alpha": scale * total,
            "target_modules": sorted(targets) if isinstance(targets, set | list) else targets,
            "layers": prev_cfg.layers_to_transform,
        }
    )
    peft_model = attach_new(model, grown, seed)
    params = trainable_params(peft_model)
    with torch.no_grad():
        for key, value in prev_state.items():
            if key not in params:
                raise ValueError(f"{previous} holds {key}, which the grown adapter lacks")
            value = value.to(params[key].device, params[key].dtype)
            if ".lora_A." in key:
                params[key][:prev_rank] = value
            else:
                params[key][:, :prev_rank] = value * (prev_scale / scale)
    for key, param in params.items():
        param.register_hook(_freeze_rows(prev_rank, rows=".lora_A." in key))  # type: ignore[no-untyped-call]
    return peft_model, prev_rank


def _freeze_rows(frozen: int, *, rows: bool):  # type: ignore[no-untyped-def]
    """A gradient hook that zeroes the first `frozen` rows (A) or columns (B): those belong to earlier versions."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        if rows:
            grad[:frozen] = 0
        else:
            grad[:, :frozen] = 0
        return grad

    return hook


def compact(state: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The same adapter (same scale) at a lower rank: per module, the truncated SVD of B A, split evenly."""
    out: dict[str, torch.Tensor] = {}
    for key_a in [k for k in state if ".lora_A." in k]:
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        a, b = state[key_a].to(torch.float64), state[key_b].to(torch.float64)
        u, sigma, vh = torch.linalg.svd(b @ a, full_matrices=False)
        root = sigma[:rank].sqrt()
        out[key_b] = (u[:, :rank] * root).to(state[key_b].dtype).contiguous()
        out[key_a] = (root[:, None] * vh[:rank]).to(state[key_a].dtype).contiguous()
    return out


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
