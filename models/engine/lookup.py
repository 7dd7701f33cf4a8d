"""Draft tokens for speculative decoding by prompt lookup.

Code repeats itself: a line being typed often continues the way an earlier line with the
same last few tokens did. The index remembers, for each recent n-gram of the sequence,
where it last occurred; the tokens that followed it are a free draft. The engine verifies
a draft in one forward pass and keeps the longest prefix that greedy decoding would have
produced anyway, so the output is unchanged and each accepted token saves a decode step.
"""

from __future__ import annotations

from collections.abc import Iterable


class NgramIndex:
    """n-gram -> index of the token that followed its latest occurrence."""

    def __init__(self, tokens: Iterable[int] = (), sizes: tuple[int, ...] = (3, 2)) -> None:
        self.sizes = tuple(sorted(sizes, reverse=True))  # longest match first
        self.tokens: list[int] = []
        self.seen: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.extend(tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        toks = self.tokens
        old = len(toks)
        toks.extend(tokens)
        for n in self.sizes:  # every n-gram that now has a token after it, latest last
            first = max(old, n)
            if first >= len(toks):
                continue
            grams = zip(*(toks[first - n + k:len(toks) - n + k] for k in range(n)), strict=True)
            self.seen[n].update(zip(grams, range(first, len(toks)), strict=True))

    def append(self, token: int) -> None:
        toks = self.tokens
        toks.append(token)
        i = len(toks) - 1  # `token` continues the n-gram that ends just before it
        for n in self.sizes:
            if i >= n:
                self.seen[n][tuple(toks[i - n:i])] = i

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the
        sequence's last n tokens (longest n that has one); [] when none did."""
        toks = self.tokens
        if limit <= 0:
            return []
        for n in self.sizes:
            if len(toks) <= n:
                continue
            start = self.seen[n].get(tuple(toks[-n:]))
            if start is not None and start < len(toks):
                out = toks[start:start + limit]
                # negative ids are image positions of a vision prompt: never a token to
                # draft (the model cannot output one); the draft ends before the first
                for k, t in enumerate(out):
                    if t < 0:
                        return out[:k]
                return out
        return []
