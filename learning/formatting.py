"""Chat-template encoding shared by training and inference, with the loss on response tokens only.

Decision: when an example has no system text we pass no system message, so the tokenizer's template
inserts its own default system prompt (SmolLM2 does). Training, evaluation and serving all go through
`encode_prompt`/`encode_example`, so the model always sees the same framing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from learning.examples import Example

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Used only for models that ship without a chat template (plain base models): ChatML, like SmolLM2's.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Encoded:
    """One tokenised training sequence: `labels` is IGNORE_INDEX everywhere but the response."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def messages(prompt: str, system: str | None, response: str | None = None) -> list[dict[str, str]]:
    """The chat messages for one turn; no system message when `system` is None (template default)."""
    out: list[dict[str, str]] = []
    if system is not None:
        out.append({"role": "system", "content": system})
    out.append({"role": "user", "content": prompt})
    if response is not None:
        out.append({"role": "assistant", "content": response})
    return out


def _ids(encoded: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x returned a list.
    if isinstance(encoded, Mapping):
        return list(encoded["input_ids"])
    return list(encoded)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a template-less tokenizer the ChatML fallback so every model formats the same way."""
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template; using a ChatML fallback")
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, system: str | None = None) -> list[int]:
    """Token ids of the prompt up to and including the assistant header: what generation starts from."""
    ensure_chat_template(tokenizer)
    return _ids(tokenizer.apply_chat_template(messages(prompt, system), tokenize=True, add_generation_prompt=True))


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    max_seq_len: int,
    *,
    end_with_eos: bool = True,
) -> Encoded:
    """Encode prompt + response; labels cover the response and its eos (not the template's trailing newline).

    `end_with_eos=False` is for responses that were cut off (anchor answers that hit the token limit):
    teaching the model to stop there would be wrong. Over-long sequences keep the response and lose the
    left of the prompt (the prompt is cut to at most half of `max_seq_len` only when needed).
    """
    prompt_ids = encode_prompt(tokenizer, example.prompt, example.system)
    full = _ids(
        tokenizer.apply_chat_template(messages(example.prompt, example.system, example.response), tokenize=True)
    )
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    response_ids = full[len(prompt_ids) :]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in response_ids:
        response_ids = response_ids[: response_ids.index(eos) + 1]
    elif eos is not None:
        response_ids = [*response_ids, eos]
    if not end_with_eos and response_ids and response_ids[-1] == eos:
        response_ids = response_ids[:-1]
    if not response_ids:
        raise ValueError(f"example {example.id!r} has an empty response")
    if len(prompt_ids) + len(response_ids) > max_seq_len:
        keep_prompt = max(max_seq_len - len(response_ids), max_seq_len // 2)
        prompt_ids = prompt_ids[-keep_prompt:]
        response_ids = response_ids[: max_seq_len - len(prompt_ids)]
        log.warning("example %r truncated to %d tokens", example.id, max_seq_len)
    return Encoded(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
    )


def encode_examples(tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_seq_len: int) -> list[Encoded]:
    """`encode_example` over a list."""
    return [encode_example(tokenizer, e, max_seq_len) for e in examples]
