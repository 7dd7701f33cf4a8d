"""Int8 weight-only quantization (`dtype="int8"`).

Every linear layer's weight becomes int8 with one float32 scale per output row
(symmetric, scale = max |w| / 127); norms, embeddings of untied models and the KV cache
stay float32, and so do the activations. A decode step then reads one byte per weight
instead of four, which is what bounds decoding on a CPU.

The matrix product for a few rows (a decode step, a speculative draft) is our C kernel
(models/kernels/gemm.c, built by models/native.py on first use); on CPUs with
AVX-512 VNNI it also quantizes the activations to int8 in blocks of 64 (as llama.cpp's
q8_0 does in blocks of 32). Longer inputs (prefill chunks) dequantize a block of rows at
a time and use the float32 matmul.
"""

from __future__ import annotations

import torch
from torch import nn

from .native import kernel, kernel_threads, set_kernel_threads

__all__ = ["DEQUANT_ROWS", "Int8Linear", "kernel", "quantize_int8", "set_kernel_threads"]

DEQUANT_ROWS = 4096  # rows of W dequantized at a time for long inputs


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias, q int8 (out, in), scale float32 (out,)."""

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
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(),
                                                           requires_grad=False)
        self.out_features, self.in_features = out_features, in_features
        lib = kernel()
        self._gemm = lib.cv_int8_gemm
        self.max_rows = lib.cv_int8_max_rows()
        self.act_block = lib.cv_int8_act_block()  # 0: float activations in the kernel

    def dequantized(self, rows: slice = slice(None)) -> torch.Tensor:
        return self.qweight[rows].float() * self.scale[rows, None]

    def unpack(self) -> torch.Tensor:
        return self.dequantized()

    def columns(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows of the dequantized weight (embedding vectors of a tied model)."""
        return self.qweight[idx].float() * self.scale[idx, None]

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
