"""Preallocated key/value buffers for one sequence.

One buffer per cache slot, sized once for the tokens a request may reach, so the
decode loop writes in place and never allocates.
"""

from __future__ import annotations

import torch


class KVCache:
    """K and V for every layer of one sequence: (layers, kv_heads, capacity, head_dim)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_layers, num_kv_heads, capacity, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def update(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (kv_heads, T, head_dim) at positions pos..pos+T; return K, V up to pos+T."""
        end = pos + k.shape[1]
        self.k[layer, :, pos:end] = k
        self.v[layer, :, pos:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def copy_prefix_from(self, other: KVCache, length: int) -> None:
        """Copy the first `length` positions of another cache of the same model."""
        self.k[:, :, :length] = other.k[:, :, :length]
        self.v[:, :, :length] = other.v[:, :, :length]
