"""Which prompts a kernel version's adapter answers: those that name something the kernel was taught.

Everything else is answered by the untouched base model, so general knowledge cannot drift there. This is
the scope classifier of SERAC (Mitchell et al., 2022) and the routing of GRACE and WISE, made from the
taught prompts alone: no learnt classifier, no model call. bench/ablation.py showed why it is needed on
this model: every update big enough to learn the facts moved general answers too, in every layer.

A taught prompt is keyed by its words, each weighted by how rare it is in English (1/frequency, from
`wordfreq`): the made-up subject "Orvania" weighs about 1, "capital" about 1e-5. A query is in scope when
it contains words carrying at least `threshold` of some taught prompt's weight, so "Which city is
Orvania's capital?" is in scope of "What is the capital of Orvania?" and "What is the capital of
France?" is not. Words match up to a short inflection ("Orvanian", "Orvania's").

Written beside each version as `scope.json` by the worker; read and validated by the model host, which
routes each request by it; used by the evaluation, so the gates measure what the host will serve.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError
from wordfreq import zipf_frequency

SCOPE_FILE = "scope.json"
LANGUAGE = "en"
FUNCTION_ZIPF = 6.0  # words at least this common ("the", "of", "what") key nothing, unless nothing else is left
MIN_STEM = 5  # words this long or longer match their inflections...
MAX_SUFFIX = 3  # ...of at most this many more letters
_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def weight(word: str) -> float:
    """How unlikely a text is to contain `word`: its inverse frequency per billion words, capped at 1."""
    return float(10.0 ** -zipf_frequency(word, LANGUAGE))


def key(prompt: str) -> dict[str, float]:
    """A taught prompt's content words and their weights."""
    found = words(prompt)
    content = {w for w in found if zipf_frequency(w, LANGUAGE) < FUNCTION_ZIPF} or found
    return {w: weight(w) for w in sorted(content)}


def _matches(word: str, query: set[str]) -> bool:
    if word in query:
        return True
    return any(
        min(len(word), len(q)) >= MIN_STEM
        and abs(len(word) - len(q)) <= MAX_SUFFIX
        and q[: len(word)] == word[: len(q)]
        for q in query
    )


def coverage(query: set[str], prompt_key: dict[str, float]) -> float:
    """The share of a taught prompt's weight that the query's words carry."""
    total = sum(prompt_key.values())
    if total <= 0:
        return 0.0
    return sum(w for word, w in prompt_key.items() if _matches(word, query)) / total


def _stem(word: str) -> str:
    """What a word shares with every word it matches (`_matches`): itself when short, else its first letters."""
    return word if len(word) < MIN_STEM else word[:MIN_STEM]


class Scope(BaseModel):
    """A version's taught prompts, keyed (`scope.json`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    threshold: float = Field(gt=0, le=1, description="Share of a taught prompt's weight a query must carry.")
    keys: list[dict[str, float]] = Field(description="One per taught prompt: its words and their weights.")
    _by_stem: dict[str, list[int]] | None = PrivateAttr(default=None)

    @classmethod
    def of(cls, prompts: Iterable[str], threshold: float) -> Scope:
        unique = sorted(set(prompts))
        return cls(threshold=threshold, keys=[key(p) for p in unique])

    def covers(self, text: str) -> bool:
        """Whether the adapter answers `text`: it names something a taught prompt names."""
        query = words(text)
        if not query:
            return False
        if self._by_stem is None:  # the host asks per request: only keys sharing a word with the query are scored
            self._by_stem = {}
            for i, k in enumerate(self.keys):
                for stem in {_stem(w) for w in k}:
                    self._by_stem.setdefault(stem, []).append(i)
        candidates = {i for q in query for i in self._by_stem.get(_stem(q), ())}
        return any(coverage(query, self.keys[i]) >= self.threshold for i in candidates)


class ScopeError(ValueError):
    """A version's scope.json cannot be read or does not match `Scope`."""


def read_scope(version_dir: Path | None) -> Scope | None:
    """The scope a version is served under; None (every prompt) for no version, or one saved without a scope."""
    if version_dir is None or not (version_dir / SCOPE_FILE).is_file():
        return None
    path = version_dir / SCOPE_FILE
    try:
        return Scope.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValidationError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        why = f"{'.'.join(map(str, first['loc'])) or 'file'}: {first['msg']}" if first else str(exc)
        raise ScopeError(
            f"{path} is unreadable ({why}); roll the kernel back to another version, or delete that file to let "
            "the adapter answer every prompt"
        ) from exc
