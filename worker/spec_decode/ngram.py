"""Prompt lookup: propose what followed an earlier occurrence of a request's last few tokens.

Input-grounded outputs (an edited file, extracted fields, a quoted passage) repeat runs of their prompt, so once the
last n tokens match a run seen before, the tokens after that run are a good guess of the next ones. Longer matches
are tried first; of equal length, the earliest occurrence wins, which for a copied document is its source in the
prompt rather than an echo of it in the output.

Each request keeps an index from every n-gram it holds to where its first occurrence ends, extended as tokens are
appended, so a lookup costs a dictionary probe per length, not a scan of the context.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n
        self._first_end: dict[tuple[int, ...], int] = {}  # n-gram -> end of its first occurrence with a successor
        self._indexed = 0  # tokens whose n-grams ending before them are in the index

    def extend(self, tokens: Sequence[int]) -> None:
        """Index the n-grams of `tokens` (the request's whole sequence so far; only the new part is read) that have
        a token after them."""
        for end in range(max(self._indexed, 1), len(tokens)):  # an n-gram ending at `end` is followed by tokens[end]
            for n in range(self.min_n, min(self.max_n, end) + 1):
                self._first_end.setdefault(tuple(tokens[end - n : end]), end)
        self._indexed = max(self._indexed, len(tokens))

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the longest earlier match of the end of `tokens` (indexed first)."""
        self.extend(tokens)
        length = len(tokens)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = self._first_end.get(tuple(tokens[length - n :]))
            if end is not None:
                return list(tokens[end : min(end + k, length)])
        return []
