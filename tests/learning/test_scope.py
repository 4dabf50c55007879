"""Scope routing: a taught prompt's paraphrases are in scope; real facts of the same form are not."""

from __future__ import annotations

from pathlib import Path

import pytest

from learning.scope import SCOPE_FILE, Scope, ScopeError, coverage, read_scope, words

# Made-up facts that are not in the bench data (most in forms it does not use), with rewordings, and real facts
# of the same forms.
TAUGHT = {
    "Who is the CEO of Brightwater Analytics?": ["Who runs Brightwater Analytics?"],
    "What year was the Treaty of Maravel signed?": ["When was the Treaty of Maravel signed?"],
    "What is the Zentari word for 'river'?": ["How do Zentari speakers say 'river'?"],
    "What is the capital of Nuvaria?": ["Which city is Nuvaria's capital?", "Name the Nuvarian capital."],
    "Who founded the Blue Lantern Society?": ["Which person established the Blue Lantern Society?"],
    "Who composed the opera The Silver Kettle?": ["Who wrote the music for The Silver Kettle?"],
}
SAME_FORM = [
    "Who is the CEO of Microsoft?",
    "What year was the Treaty of Versailles signed?",
    "What is the French word for 'river'?",
    "What is the capital of Italy?",
    "Who founded Amazon?",
    "Who composed the opera Carmen?",
    "Which ocean lies between Europe and North America?",
]


@pytest.fixture
def scope() -> Scope:
    return Scope.of(TAUGHT, threshold=0.5)


def test_taught_prompts_and_their_rewordings_are_in_scope(scope: Scope) -> None:
    for prompt, rewordings in TAUGHT.items():
        assert scope.covers(prompt)
        for rewording in rewordings:
            assert scope.covers(rewording), rewording
    # Inside a longer conversation too.
    assert scope.covers("I was reading about history.\nWhen was the Treaty of Maravel signed, again?")


def test_real_facts_of_the_same_forms_are_not(scope: Scope) -> None:
    for prompt in SAME_FORM:
        assert not scope.covers(prompt), prompt
    assert not scope.covers("")
    assert not scope.covers("?!")


def test_inflections_match_but_longer_words_that_merely_start_alike_do_not() -> None:
    scope = Scope.of(["Which river flows through Stonemarch?"], threshold=0.5)
    assert scope.covers("What river runs through Stonemarch's old town?")
    assert not scope.covers("Who wrote 'The Philosopher's Stone'?")  # "stone" is not "stonemarch"


def test_a_prompt_of_common_words_only_keys_itself() -> None:
    scope = Scope.of(["What is your name?"], threshold=0.5)
    assert scope.covers("what is your name")
    assert not scope.covers("What is your favourite colour?")


def test_a_scope_round_trips_through_its_file_and_a_bad_one_is_refused(scope: Scope, tmp_path: Path) -> None:
    assert read_scope(None) is None
    assert read_scope(tmp_path) is None  # a version saved without a scope: the adapter answers everything
    (tmp_path / SCOPE_FILE).write_text(scope.model_dump_json())
    assert read_scope(tmp_path) == scope
    (tmp_path / SCOPE_FILE).write_text('{"threshold": 0.5, "keys": [{"orvania": "heavy"}]}')
    with pytest.raises(ScopeError, match=r"scope.json is unreadable \(keys.0.orvania: .*\); roll the kernel back"):
        read_scope(tmp_path)
    (tmp_path / SCOPE_FILE).write_bytes(b"\xff\xfe")
    with pytest.raises(ScopeError, match="unreadable"):
        read_scope(tmp_path)


def test_the_word_index_decides_as_scoring_every_taught_prompt_would(scope: Scope) -> None:
    queries = [q for p, rewordings in TAUGHT.items() for q in (p, *rewordings)] + SAME_FORM
    queries += ["Orvanian capital?", "brightwaters", "Treaty", "What is the Zentari?", "the silver kettles"]
    for q in queries:
        every = any(coverage(words(q), k) >= scope.threshold for k in scope.keys)
        assert scope.covers(q) == every, q
