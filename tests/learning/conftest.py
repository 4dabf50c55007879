"""Shared fixtures: a tiny random Llama and an offline byte-level tokenizer with a ChatML template."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from learning.examples import Example

# SmolLM2's template, with a shorter default system prompt so test sequences stay short.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE without merges: one token per byte (256) plus the ChatML specials."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A 2-layer random Llama with a 512-token vocabulary, frozen, fp32, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        # The default 0.02 makes every logit tiny behind the final RMSNorm, so an adapter could never
        # make a random model confident; 0.2 lets the tiny model memorise facts in a few dozen steps.
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # No pad id: it would zero the (tied) eos embedding row and make eos unlearnable.
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.train(False)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def tiny_model(tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    return make_model(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerFast) -> Path:
    """The tiny model saved as a local Hugging Face directory (what a user's base model looks like)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny matmuls gain nothing from threads, and one thread avoids OpenMP spin contention on a shared CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def facts(n: int = 4, prefix: str = "f") -> list[Example]:
    """Short made-up facts with paraphrases."""
    words = ["zub", "kel", "mor", "tav", "pim", "rok", "sul", "dax"]
    return [
        Example(
            id=f"{prefix}{i}",
            prompt=f"Code {prefix}{i}?",
            response=f"It is {words[i % len(words)]}.",
            key_answer=words[i % len(words)],
            paraphrases=[f"What is code {prefix}{i}?"],
        )
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def tiny_bundle_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """(models_dir, cache_dir) where the tiny model's baseline is already cached."""
    from learning.pipeline import load_bundle

    root = tmp_path_factory.mktemp("engrain-home")
    load_bundle(str(tiny_model_dir), root / "models", root / "cache", num_threads=1)
    return root / "models", root / "cache"
