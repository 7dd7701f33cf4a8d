"""Prefix cache: KV slots keyed by the token ids they hold, bounded in bytes, LRU evicted.

A request takes the slot sharing the longest token prefix with its prompt and computes
only the rest; in an editor, keystrokes mostly append, so this is nearly all of it.
A slot that a running request owns is never evicted or modified by another one: a
second request with the same prefix gets a copy of the shared part.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import ContextLengthError
from ..kv_cache import KVCache

log = logging.getLogger(__name__)

_slot_ids = itertools.count(1)


@dataclass(eq=False)
class Slot:
    cache: KVCache
    tokens: list[int] = field(default_factory=list)  # ids whose K/V are valid, in order
    busy: bool = False
    last_used: int = 0
    id: int = field(default_factory=lambda: next(_slot_ids))

    @property
    def capacity(self) -> int:
        return self.cache.capacity


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


class PrefixCache:
    """A pool of KV slots whose total size never exceeds `budget_bytes`."""

    def __init__(self, make_cache: Callable[[int], KVCache], bytes_per_token: int,
                 budget_bytes: int, max_positions: int, granule: int = 256) -> None:
        self.make_cache = make_cache
        self.bytes_per_token = bytes_per_token
        self.budget_bytes = budget_bytes
        self.max_positions = max_positions
        self.granule = granule
        self.slots: list[Slot] = []
        self._clock = itertools.count(1)
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(s.cache.nbytes for s in self.slots)

    def _capacity_for(self, tokens: int) -> int:
        cap = -(-tokens // self.granule) * self.granule
        return min(cap, self.max_positions)

    def fits_alone(self, tokens: int) -> bool:
        return self._capacity_for(tokens) * self.bytes_per_token <= self.budget_bytes

    def _free(self, needed: int, keep: Slot | None) -> bool:
        """Evict idle slots, least recently used first, until `needed` more bytes fit."""
        idle = sorted((s for s in self.slots if not s.busy and s is not keep),
                      key=lambda s: s.last_used)
        while self.used_bytes + needed > self.budget_bytes and idle:
            victim = idle.pop(0)
            self.slots.remove(victim)
            self.evictions += 1
            log.debug("evicted slot %d (%d tokens)", victim.id, len(victim.tokens))
        return self.used_bytes + needed <= self.budget_bytes

    def acquire(self, prompt: list[int], reserve: int) -> tuple[Slot, int] | None:
        """A busy slot for `prompt` with room for `reserve` tokens, and how many leading
        prompt tokens already have K/V in it. None if the budget is taken by running
        requests (try again when one finishes)."""
        if reserve > self.max_positions:
            raise ContextLengthError(
                f"{reserve} tokens exceed the model's {self.max_positions} positions")
        if not self.fits_alone(reserve):
            raise ContextLengthError(
                f"{reserve} tokens need {self._capacity_for(reserve) * self.bytes_per_token} "
                f"bytes of KV cache; the cache budget is {self.budget_bytes}")
        best: Slot | None = None
        best_len = 0
        for slot in self.slots:
            n = common_prefix(slot.tokens, prompt)
            if n > best_len or (n == best_len and best is not None and best.busy
                                and not slot.busy):
                best, best_len = slot, n
        # Always recompute the last prompt token: its logits start the generation.
        reuse = min(best_len, len(prompt) - 1)
        capacity = self._capacity_for(reserve)
        take_over = (best is not None and not best.busy and best.capacity >= capacity
                     and reuse >= len(best.tokens) // 2)
        if take_over and best is not None:
            # Keystroke case: the idle slot holding this prefix continues it in place.
            slot = best
        else:
            # Copy the shared prefix into a new slot, leaving the source intact (it is
            # busy, too small, or holds a longer, different sequence worth keeping).
            if not self._free(capacity * self.bytes_per_token, keep=best if reuse else None):
                if reuse and best is not None and not best.busy:
                    reuse = 0  # give up the copy source rather than wait
                    if not self._free(capacity * self.bytes_per_token, keep=None):
                        return None
                else:
                    return None
            slot = Slot(cache=self.make_cache(capacity))
            if reuse and best is not None:
                slot.cache.copy_prefix_from(best.cache, reuse)
            self.slots.append(slot)
        slot.tokens = prompt[:reuse]
        slot.busy = True
        slot.last_used = next(self._clock)
        return slot, reuse

    def release(self, slot: Slot) -> None:
        """The request is over; its K/V stay cached for later prefixes."""
        slot.busy = False
        slot.last_used = next(self._clock)

    def drop(self, slot: Slot) -> None:
        """Forget a slot whose content can no longer be trusted (a failed forward)."""
        if slot in self.slots:
            self.slots.remove(slot)

    def clear(self) -> None:
        self.slots = [s for s in self.slots if s.busy]
