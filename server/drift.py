"""How different incoming experiences are from what a kernel was trained on: KL of word distributions.

The server has no tokenizer (it never loads the model), so "tokens" here are lower-cased words and
numbers. That is enough to tell new subject matter from more of the same.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

_WORD = re.compile(r"\w+", re.UNICODE)


def word_counts(texts: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w.lower() for w in _WORD.findall(text))
    return counts


def kl_divergence(p: Counter[str], q: Counter[str], alpha: float = 0.1) -> float:
    """KL(P || Q) in nats, with add-`alpha` smoothing over the union vocabulary so Q never has a zero.

    A small alpha: with add-one smoothing the prior swamps the few hundred words of a typical batch.
    """
    vocab = set(p) | set(q)
    if not p or not vocab:
        return 0.0
    p_total = sum(p.values()) + alpha * len(vocab)
    q_total = sum(q.values()) + alpha * len(vocab)
    kl = 0.0
    for word in vocab:
        pw = (p[word] + alpha) / p_total
        qw = (q[word] + alpha) / q_total
        kl += pw * math.log(pw / qw)
    return kl
