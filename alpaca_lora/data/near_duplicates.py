"""Self-instruct's near-duplicate filter (ROUGE-L F1 against every instruction kept so far), fast.

Stanford's generator scores each new instruction against the whole pool with ``rouge_score`` in a
process pool, so its cost grows with the pool. We take exactly the same decisions for a fraction
of the cost: ROUGE-L's F1 is ``2·LCS/(m+n)`` and an LCS can never exceed the bag-of-words overlap
of the two token lists, so an inverted index computes that overlap for the whole pool at once
(numpy) and only the few instructions whose bound could pass the threshold are scored, by
``rouge_score`` itself, on the tokens of ``rouge_score``'s own default tokenizer.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from rouge_score import rouge_scorer, tokenizers

# Bounds are compared with this much slack so that float rounding can never prune a pair whose
# exact score rounds to just above the threshold: pruning is then strictly conservative.
_BOUND_SLACK = 1e-9


class NearDuplicateIndex:
    """A growing pool of instructions; ``is_near_duplicate`` is Stanford's ``max ROUGE-L F1 > threshold``."""

    def __init__(self, threshold: float = 0.7):
        self.threshold = threshold
        self._tokenizer = tokenizers.DefaultTokenizer(use_stemmer=False)
        self._vocabulary: dict[str, int] = {}
        self._tokens: list[list[str]] = []
        self._lengths = _GrowingArray(np.int32)
        self._postings: list[tuple[_GrowingArray, _GrowingArray]] = []  # per token id: (pool ids, counts)

    def tokenize(self, text: str) -> list[str]:
        return self._tokenizer.tokenize(text)

    def add(self, instruction: str) -> None:
        tokens = self.tokenize(instruction)
        pool_id = len(self._tokens)
        self._tokens.append(tokens)
        self._lengths.append(len(tokens))
        for token, count in Counter(tokens).items():
            token_id = self._vocabulary.setdefault(token, len(self._vocabulary))
            if token_id == len(self._postings):
                self._postings.append((_GrowingArray(np.int32), _GrowingArray(np.int32)))
            ids, counts = self._postings[token_id]
            ids.append(pool_id)
            counts.append(count)

    def is_near_duplicate(self, instruction: str) -> bool:
        return any(score > self.threshold for score in self._candidate_scores(self.tokenize(instruction)))

    def _candidate_scores(self, tokens: list[str]):
        """Yields exact ROUGE-L F1 scores of the pool entries whose upper bound reaches the threshold."""
        if not tokens or not self._tokens:
            return
        overlap = np.zeros(len(self._tokens), dtype=np.int32)
        for token, count in Counter(tokens).items():
            token_id = self._vocabulary.get(token)
            if token_id is not None:
                ids, counts = self._postings[token_id]
                overlap[ids.view()] += np.minimum(counts.view(), count)
        bound = 2.0 * overlap / (len(tokens) + self._lengths.view())
        candidates = np.flatnonzero(bound >= self.threshold - _BOUND_SLACK)
        for pool_id in candidates[np.argsort(-bound[candidates], kind="stable")]:
            # The same call, argument order and float arithmetic as Stanford's generator.
            yield rouge_scorer._score_lcs(tokens, self._tokens[pool_id]).fmeasure


class _GrowingArray:
    """An append-only numpy array with amortised O(1) appends."""

    def __init__(self, dtype):
        self._data = np.empty(8, dtype=dtype)
        self._size = 0

    def append(self, value: int) -> None:
        if self._size == len(self._data):
            self._data = np.resize(self._data, 2 * len(self._data))
        self._data[self._size] = value
        self._size += 1

    def view(self) -> np.ndarray:
        return self._data[: self._size]
