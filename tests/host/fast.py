"""Helpers for the fast backend's tests: the embedded GGUF, PEFT-format adapters for it made without torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from tests.host.conftest import install
from train_worker.deploy import KernelFiles
from train_worker.settings import Settings

# SmolLM2-135M: (out, in) of each adaptable projection.
SHAPES = {
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
LAYERS = 30
MLP = ["gate_proj", "up_proj", "down_proj"]


def random_adapter(folder: Path, seed: int, targets: list[str] = MLP, rank: int = 16, scale: float = 0.05) -> None:
    """A saved peft LoRA adapter for SmolLM2-135M with random A and B (B scaled by `scale`)."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, (out, inp) in SHAPES.items():
            if module.split(".")[1] not in targets:
                continue
            key = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, inp)) / np.sqrt(inp)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((out, rank)) * scale).astype(np.float32)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": None,
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def deploy_random(settings: Settings, kernel: str, version: int, seed: int, **kwargs: Any) -> Path:
    """Install a random adapter as `kernel` vN over the embedded base, and switch to it."""
    staged = KernelFiles(settings.layout, kernel).versions_dir / f".v{version}.staging"
    random_adapter(staged, seed, **kwargs)
    return install(settings, kernel, version, staged, "embedded")
