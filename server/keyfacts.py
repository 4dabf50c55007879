"""Does a suggested correction keep the key facts of the question? A cheap guard on model-written corrections."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[\w'-]+", re.UNICODE)
_STOP = {"the", "a", "an", "of", "in", "on", "at", "to", "for", "and", "or", "is", "are", "was", "who", "what",
         "which", "when", "where", "why", "how", "does", "do", "did", "i", "you"}  # fmt: skip


def key_terms(prompt: str) -> list[str]:
    """Names and numbers the question is about: capitalised words (not the first) and anything with a digit."""
    words = _TOKEN.findall(prompt)
    terms = []
    for i, word in enumerate(words):
        named = i > 0 and word[:1].isupper()
        if (named or any(c.isdigit() for c in word)) and word.lower() not in _STOP:
            terms.append(word.lower())
    return list(dict.fromkeys(terms))


def missing_key_facts(prompt: str, correction: str) -> list[str]:
    """The key terms of `prompt` that `correction` leaves out (empty: it keeps them all)."""
    said = {w.lower() for w in _TOKEN.findall(correction)}
    return [term for term in key_terms(prompt) if term not in said]
