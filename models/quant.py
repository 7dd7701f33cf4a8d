"""Int8 weight-only quantization (`dtype="int8"`).

Every linear layer's weight becomes int8 with one float32 scale per output row
(symmetric, scale = max |w| / 127); norms, embeddings of untied models and the KV cache
stay float32, and so do the activations. A decode step then reads one byte per weight
instead of four, which is what bounds decoding on a CPU.

The matrix product for a few rows (a decode step, a speculative draft) is our C kernel
(models/kernels/gemm.c, built by models/native.py on first use). On CPUs with AVX-512
VNNI the weights are kept in the kernel's VPDPBUSD tiles (pack_tiles) and the activations
are quantized to int8 in blocks of 64 (as llama.cpp's q8_0 does in blocks of 32);
elsewhere they stay row-major. Longer inputs (prefill chunks) dequantize a block of rows
at a time and use the float32 matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from .native import kernel, kernel_threads, set_kernel_threads

__all__ = ["DEQUANT_ROWS", "Int8Linear", "kernel", "quantize_int8", "set_kernel_threads"]

DEQUANT_ROWS = 4096  # rows of W dequantized (and packed) at a time; a multiple of TILE


TILE = 16  # output rows per tile of the packed (VNNI) layout
TILE_IN = 64  # inputs padded to a multiple of this in the packed layout


def pack_tiles(q: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) -> the kernel's VPDPBUSD tiles (see vnni_tiles in gemm.c): uint8
    (tiles, in / 4, 16, 4), tile t holding rows 16t.. with their four weights per group
    of four inputs side by side, each + 128; rows and inputs padded with zero weights."""
    n_out, n_in = q.shape
    rows, cols = -(-n_out // TILE) * TILE, -(-n_in // TILE_IN) * TILE_IN
    out = torch.empty(rows // TILE, cols // 4, TILE, 4, dtype=torch.uint8)
    for o in range(0, rows, DEQUANT_ROWS):  # in blocks: no full-size temporaries
        n = min(DEQUANT_ROWS, rows - o)
        blk = torch.full((n, cols), 128, dtype=torch.uint8)
        real = q[o:o + n]
        # w + 128 as a byte is w's two's-complement byte with its top bit flipped
        blk[:real.shape[0], :n_in] = real.view(torch.uint8).bitwise_xor(128)
        out[o // TILE:(o + n) // TILE] = blk.view(n // TILE, TILE, cols // 4, 4).permute(0, 2, 1, 3)
    return out


def unpack_tiles(tiles: torch.Tensor, n_out: int, n_in: int,
                 rows: slice = slice(None)) -> torch.Tensor:
    """The int8 (out, in) rows `rows` of packed tiles (pack_tiles' inverse)."""
    start, stop, _ = rows.indices(n_out)
    t0, t1 = start // TILE, -(-stop // TILE)
    part = tiles[t0:t1].bitwise_xor(128).view(torch.int8)
    part = part.permute(0, 2, 1, 3).reshape((t1 - t0) * TILE, -1)
    return part[start - t0 * TILE:stop - t0 * TILE, :n_in]


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, q int8 (out, in), scale float32 (out,).

    `qweight` is q itself, or on CPUs with AVX-512 VNNI the kernel's packed tiles of it
    (`packed`; see pack_tiles); `int8_rows()` gives q either way."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach()
        out_features, in_features = w.shape
        q = torch.empty(out_features, in_features, dtype=torch.int8)
        scale = torch.empty(out_features)
        for o in range(0, out_features, DEQUANT_ROWS):  # in blocks: no full-size temporaries
            blk = w[o:o + DEQUANT_ROWS].float()
            s = blk.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q[o:o + DEQUANT_ROWS] = torch.round(blk / s[:, None]).clamp_(-127, 127)
            scale[o:o + DEQUANT_ROWS] = s
        lib = kernel()
        self.packed = bool(lib.cv_int8_packed())
        self.register_buffer("qweight", pack_tiles(q) if self.packed else q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)
        self.out_features, self.in_features = out_features, in_features
        self._gemm = lib.cv_int8_gemm
        self._embed = lib.cv_int8_embed
        self._dequant = lib.cv_int8_dequant
        self.max_rows = lib.cv_int8_max_rows()
        self.act_block = lib.cv_int8_act_block()  # 0: float activations in the kernel

    def int8_rows(self, rows: slice = slice(None)) -> torch.Tensor:
        """q (out, in), or the rows `rows` of it."""
        if self.packed:
            return unpack_tiles(self.qweight, self.out_features, self.in_features, rows)
        return self.qweight[rows]

    def dequantized(self, rows: slice = slice(None)) -> torch.Tensor:
        if self.packed:  # one pass in C (torch's copy out of the tiles is 5x slower)
            start, stop, _ = rows.indices(self.out_features)
            out = torch.empty(max(0, stop - start), self.in_features)
            if stop > start and self._dequant(
                    self.qweight.data_ptr(), self.scale.data_ptr(), self.out_features,
                    self.in_features, start, stop, out.data_ptr()) != 0:
                raise IndexError(f"rows {start}:{stop} of {self.out_features}")
            return out
        return self.int8_rows(rows).float() * self.scale[rows, None]

    def unpack(self) -> torch.Tensor:
        return self.dequantized()

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of the dequantized weight (embedding vectors of a tied model)."""
        if not self.packed:
            return self.qweight[idx].float() * self.scale[idx, None]
        ids = idx.reshape(-1).to(torch.int64).contiguous()  # read out of the tiles in C
        out = torch.empty(len(ids), self.in_features)
        if self._embed(self.qweight.data_ptr(), self.scale.data_ptr(), self.out_features,
                       self.in_features, ids.data_ptr(), len(ids), out.data_ptr()) != 0:
            raise IndexError("token id outside the vocabulary")
        return out.view(*idx.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        T = x.shape[0]
        if T <= self.max_rows:
            y = torch.empty(T, self.out_features)
            rc = self._gemm(x.data_ptr(), T, self.in_features, self.qweight.data_ptr(),
                            self.scale.data_ptr(),
                            None if self.bias is None else self.bias.data_ptr(),
                            y.data_ptr(), self.out_features,
                            kernel_threads())
            if rc != 0:
                raise RuntimeError("int8 kernel rejected its arguments")
            return y
        y = torch.empty(T, self.out_features)
        for o in range(0, self.out_features, DEQUANT_ROWS):
            rows = slice(o, min(o + DEQUANT_ROWS, self.out_features))
            y[:, rows] = x @ self.dequantized(rows).t()
        if self.bias is not None:
            y += self.bias
        return y


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every linear layer of a loaded Transformer by its int8 form, in place."""
    from .transformer import Linear

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, Int8Linear(child.unpack(), child.bias))
                del child
    model._plan = None  # a whole-step plan held the float weights: plan again
    return model
