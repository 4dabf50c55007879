"""The pure parts of serving: choosing tokens, and turning tokens into streamed text with stop sequences."""

from __future__ import annotations

import numpy as np
import pytest

from host.sampling import Sampling, make_rng, pick, probabilities
from host.textstream import TextStream
from tests.learning.conftest import make_tokenizer


def test_greedy_is_argmax_and_ignores_the_seed() -> None:
    logits = np.array([0.1, 2.0, 1.9, -1.0], dtype=np.float32)
    assert make_rng(Sampling(seed=7)) is None
    assert pick(logits, Sampling(seed=7), None) == 1


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    ids, p = probabilities(logits, 1.0, 0.75)
    assert list(ids) == [0, 1] and p == pytest.approx([0.625, 0.375])
    ids, p = probabilities(logits, 1.0, 0.81)
    assert list(ids) == [0, 1, 2]
    ids, _ = probabilities(logits, 1.0, 1e-9)
    assert list(ids) == [0]  # always at least the most likely token


def test_sampling_follows_temperature_and_a_seed_repeats() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    spec = Sampling(temperature=1.0, seed=123)
    first = [pick(logits, spec, rng) for rng in [make_rng(spec)] for _ in range(2000)]
    again = [pick(logits, spec, rng) for rng in [make_rng(spec)] for _ in range(2000)]
    assert first == again
    freq = np.bincount(first, minlength=3) / len(first)
    assert freq == pytest.approx([0.6, 0.3, 0.1], abs=0.04)
    cold = Sampling(temperature=0.25, seed=1)
    rng = make_rng(cold)
    assert np.bincount([pick(logits, cold, rng) for _ in range(2000)], minlength=3)[0] > 1800
    other = [
        pick(logits, s, rng) for s in [Sampling(temperature=1.0, seed=124)] for rng in [make_rng(s)] for _ in range(200)
    ]
    assert other != first[:200]
    assert make_rng(Sampling(temperature=1.0, seed=-1)) is not None  # any 64-bit seed


def stream_of(text: str, stops: list[str]) -> tuple[list[str], TextStream]:
    tok = make_tokenizer()
    stream = TextStream(tok, stops)
    pieces = []
    for token in tok.encode(text):
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.flush())
    return pieces, stream


def test_text_is_released_as_it_comes_and_equals_the_whole() -> None:
    pieces, stream = stream_of("Hello, wörld!", [])
    assert "".join(pieces) == stream.text == "Hello, wörld!"
    assert "" in pieces  # the two bytes of ö: the first waits for the second
    assert not stream.stopped


def test_a_stop_sequence_cuts_the_text_and_is_never_shown() -> None:
    pieces, stream = stream_of("The answer is 42. END of it", ["END", "never"])
    assert stream.stopped and stream.text == "The answer is 42. "
    assert "".join(pieces) == stream.text
    assert not any("E" in p for p in pieces)  # the held-back 'E' and 'EN' were never released
    pieces, stream = stream_of("an ENDING", ["ENDS"])  # a near miss is released once it cannot match
    assert not stream.stopped and "".join(pieces) == "an ENDING"
