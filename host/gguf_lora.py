"""A kernel version's peft LoRA adapter as a GGUF LoRA adapter that llama.cpp applies over the base GGUF.

Written once per version, beside it (`versions/vN/lora.gguf`), atomically, the first time the fast backend
meets the version; the worker's deploy stays as it is. The conversion is llama.cpp's own
(`convert_lora_to_gguf.py`): tensors renamed to GGUF's (`blk.N.ffn_up.weight.lora_a`), and the rows of the
q and k projections' B permuted as the base GGUF's q and k weights were (llama's rotary layout).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

LORA_FILE = "lora.gguf"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Hugging Face Llama module -> GGUF tensor (per block).
MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])\.weight$")


class ExportError(Exception):
    """The adapter cannot become a GGUF LoRA for this base (an unsupported architecture or adapter kind)."""


@dataclass(frozen=True)
class BaseShape:
    """What the conversion needs to know about the base GGUF."""

    architecture: str
    n_head: int
    n_head_kv: int
    n_layer: int


def base_shape(base_gguf: Path) -> BaseShape:
    reader = gguf.GGUFReader(str(base_gguf))

    def value(key: str) -> object:
        field = reader.get_field(key)
        if field is None:
            raise ExportError(f"{base_gguf.name} has no {key}")
        return field.contents()

    arch = str(value("general.architecture"))
    return BaseShape(
        architecture=arch,
        n_head=int(str(value(f"{arch}.attention.head_count"))),
        n_head_kv=int(str(value(f"{arch}.attention.head_count_kv"))),
        n_layer=int(str(value(f"{arch}.block_count"))),
    )


def permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k permutation (`LlamaModel.permute`) of the output rows: halves of each head interleaved."""
    rows = weights.shape[0]
    return weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def lora_tensors(adapter_dir: Path, shape: BaseShape) -> tuple[dict[str, np.ndarray], float]:
    """The GGUF-named lora_a/lora_b tensors (float32) and the alpha that gives peft's scale."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if shape.architecture != "llama":
        raise ExportError(f"GGUF LoRA export supports llama bases; this base is {shape.architecture!r}")
    for unsupported in ("use_dora", "modules_to_save"):
        if config.get(unsupported):
            raise ExportError(f"the adapter uses {unsupported}, which a GGUF LoRA adapter cannot carry")
    if config.get("bias", "none") != "none":
        raise ExportError("the adapter trains biases, which a GGUF LoRA adapter cannot carry")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= rank**0.5  # llama.cpp scales by alpha / rank; rsLoRA by alpha / sqrt(rank)
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    out: dict[str, np.ndarray] = {}
    for key, tensor in weights.items():
        match = _KEY.match(key)
        if match is None or match.group(2) not in MODULES:
            raise ExportError(f"the adapter holds {key!r}, which has no GGUF LoRA counterpart")
        block, module, part = int(match.group(1)), match.group(2), match.group(3)
        data = tensor.astype(np.float32)
        if part == "B" and module == "self_attn.q_proj":
            data = permute_rows(data, shape.n_head)
        elif part == "B" and module == "self_attn.k_proj":
            data = permute_rows(data, shape.n_head_kv)
        out[f"blk.{block}.{MODULES[module]}.weight.lora_{part.lower()}"] = np.ascontiguousarray(data)
    return out, alpha


def export(adapter_dir: Path, shape: BaseShape) -> Path:
    """`adapter_dir/lora.gguf`, written atomically unless it is there already; returns its path."""
    target = adapter_dir / LORA_FILE
    if target.is_file():
        return target
    tensors, alpha = lora_tensors(adapter_dir, shape)
    tmp = adapter_dir / f".{LORA_FILE}.{os.getpid()}.tmp"
    writer = gguf.GGUFWriter(str(tmp), arch=shape.architecture)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, data in sorted(tensors.items()):
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    return target
