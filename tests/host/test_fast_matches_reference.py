"""The fast backend against the fp32 reference on the real model: a kernel's adapter means the same on both.

On llama.cpp's f32 copy of the base (no quantised matmuls), greedy answers with a deployed adapter must
match transformers + peft on the dequantised model; a wrong q/k permutation or scale in the GGUF export
would change them from the first tokens. The bare base must match too on questions whose answers reach a
near-tie, which llama.cpp's default f16 KV cache and flash attention flip.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from host.engine import Engine, Job
from host.llama_backend import LlamaCppBackend
from learning.formatting import encode_prompt
from learning.generate import generate_ids
from learning.model_loading import ensure_base_model, load_base, setup_threads
from tests.host.conftest import install
from train_worker.settings import Settings

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three fruits.", "Why is the sky blue?", "What is 2+2?"]
# General probes whose answers reach a near-tie: with llama.cpp's f16 KV cache or its flash attention, some of
# them part from transformers' answer (4 of these in the host, 2 on llama.cpp alone).
NEAR_TIES = [
    "What language is spoken in Brazil?",
    "What language is spoken in Egypt?",
    "What is the largest desert in the world?",
    "How many bones are in the adult human body?",
    "What is the chemical symbol of uranium?",
    "Who wrote the novel 'The Lord of the Rings'?",
]
TOKENS = 48


def test_an_adapter_answers_alike_on_both_backends(real_caches: Path, home: Path, tokenizer_cache: Path) -> None:
    setup_threads()
    model_dir = ensure_base_model(None, real_caches / "models")
    base, tok = load_base(model_dir)
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)  # a strong adapter: it changes most answers
    prompts = [encode_prompt(tok, q) for q in QUESTIONS]
    reference = generate_ids(peft_model, tok, prompts, max_new_tokens=TOKENS)
    near_ties = [encode_prompt(tok, q) for q in NEAR_TIES]
    with peft_model.disable_adapter():
        bare = generate_ids(peft_model, tok, prompts, max_new_tokens=TOKENS)
        bare_near_ties = generate_ids(peft_model, tok, near_ties, max_new_tokens=TOKENS)
    assert sum(r != b for r, b in zip(reference, bare, strict=True)) >= 3  # the adapter matters

    settings = Settings(host_gguf_type="f32", host_threads=2)
    shutil.copytree(tokenizer_cache, settings.layout.cache)
    (settings.layout.models).mkdir(parents=True)
    staged = settings.layout.kernel_dir("k") / "versions" / ".v1.staging"
    peft_model.save_pretrained(str(staged))
    install(settings, "k", 1, staged, "embedded")
    engine = Engine(settings, LlamaCppBackend(settings))
    engine.start()
    try:
        assert engine.ready.wait(600) and engine.status == "ok"
        futures = [engine.submit(Job("k", p, TOKENS)) for p in prompts]
        served = [f.result(300).tokens for f in futures]
        base_futures = [engine.submit(Job("undeployed", p, TOKENS)) for p in near_ties]
        served_bare = [f.result(300).tokens for f in base_futures]
    finally:
        engine.stop()
    assert served == reference
    assert served_bare == bare_near_ties
