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


class DraftPolicy:
    """Whether drafts pay on this machine, for this model, at all.

    A turn that verifies d draft tokens costs about `step + d * row` seconds and yields
    1 + p + p^2 + ... + p^d tokens on average, when each draft token is right with
    probability p once the ones before it were. Where a step is bound by memory (the
    default float32 model, a big model) a verified row costs a few per cent of a step
    and drafts pay even at a low p; where it is bound by arithmetic (the embedded model's
    int8 steps at a long context, where each row's attention costs half a step) they pay
    only when they are nearly always right, and drafting makes decoding slower. So when
    no d up to the caller's cap promises more tokens per second than plain steps by a
    margin, at the acceptance measured over recent drafts, the policy drafts nothing;
    otherwise the draft runs to the cap (the caller's, which grows while drafts are
    right). The acceptance is the engine's, not a request's: within a request drafts come
    right in runs (a copied line), which a request's record so far does not foresee
    (measured: judging by it cut the float32 model's gain from 1.55x to 1.4x). Costs are
    running averages of measured turns. The output is the same whatever is chosen:
    drafts are verified."""

    # a draft must promise this much more speed than a plain step (the costs are noisy
    # averages); and one refusal in `PROBE` drafts a single token anyway, so that the
    # averages follow a change of context length, machine load or text
    MARGIN = 1.15
    PROBE = 32

    def __init__(self, prior: float = 0.5, smoothing: float = 0.2) -> None:
        self.acceptance = prior  # of draft tokens, over recent drafts
        self.smoothing = smoothing
        self.step: float | None = None  # seconds for a turn of one row
        self.row: float | None = None  # extra seconds for each verified draft row
        self._refused = 0

    def limit(self, cap: int) -> int:
        """How many tokens to draft, given that the caller would draft `cap`."""
        if cap <= 0:
            return 0
        if self.step is None or self.row is None:
            return min(cap, 2)  # nothing measured yet: a short draft measures the costs
        p, step, row = self.acceptance, max(self.step, 1e-9), max(self.row, 0.0)
        expect = gain = 1.0
        for d in range(1, cap + 1):
            gain *= p
            expect += gain
            if expect / (step + d * row) > self.MARGIN / step:
                return cap
        self._refused += 1
        return 1 if self._refused % self.PROBE == 0 else 0

    def record_turn(self, rows: int, seconds: float) -> None:
        """A measured turn of one request: `rows` = 1 + the draft's length."""
        a = self.smoothing
        if rows <= 1:
            if self.step is not None:  # a turn the OS interrupted says little
                seconds = min(seconds, 2 * self.step)
            self.step = seconds if self.step is None else (1 - a) * self.step + a * seconds
        elif self.step is not None:
            per_row = max(0.0, (seconds - self.step) / (rows - 1))
            if self.row is not None:
                per_row = min(per_row, 2 * self.row + 0.1 * self.step)
            self.row = per_row if self.row is None else (1 - a) * self.row + a * per_row

    def judged(self, drafted: int, accepted: int) -> None:
        """A verified draft whose first `accepted` tokens were right: each right token
        and the first wrong one are trials of p."""
        trials = accepted + (accepted < drafted)
        if trials:
            a = self.smoothing / 4  # slowly: it speaks for many requests
            self.acceptance = (1 - a) * self.acceptance + a * accepted / trials
