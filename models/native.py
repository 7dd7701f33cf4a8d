"""Our C kernels (models/kernels/gemm.c): matrix products of a few rows against int8 or
float32 weights, the bulk of a decode step's work.

The source is compiled on first use with the machine's C compiler for the machine's own
instruction set and kept in the user's cache folder (keyed by the source, the flags and the
machine), so the build happens once per machine. Where no compiler works, `kernel()` raises
ConfigError: int8 weights need the kernel, float32 weights fall back to torch's matmul.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("kernels") / n for n in ("gemm.c", "ops.c"))
# no FMA contraction beyond the kernel's own: each row of x must get the same bits
# whatever the number of rows (a draft's verification equals its decode steps)
FLAG_SETS = (["-O3", "-march=native", "-ffp-contract=off", "-pthread"],
             ["-O3", "-ffp-contract=off", "-pthread"], ["-O3", "-ffp-contract=off"])

_lib = None
_lib_lock = threading.Lock()
_local = threading.local()


def set_kernel_threads(n: int) -> None:
    """Threads the calling thread's int8 products use (0: torch's setting). The engine
    decodes with every core in the kernel, which streams the weights, and one torch thread
    for the small operations between products: torch's own workers would compete for the
    cores with the kernel's, which spin briefly between products."""
    _local.threads = n


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "codevista" / "kernels"


def _compile() -> ctypes.CDLL:
    src = b"".join(p.read_bytes() for p in SOURCES)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise ConfigError("int8 weights need a C compiler (cc or gcc) to build their kernel "
                          "once; install one or use dtype float32")
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(src + " ".join([cc, *flags, platform.machine(),
                                             platform.node()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"native-{key}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
            os.close(fd)
            try:
                proc = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp,
                                       *map(str, SOURCES), "-lm"], capture_output=True,
                                      text=True, timeout=120)
                failed = proc.returncode != 0 and (proc.stderr.strip().splitlines()[-1:]
                                                   or ["failed"])[0]
            except (OSError, subprocess.SubprocessError) as e:
                failed = str(e)
            if failed:
                os.unlink(tmp)
                errors.append(failed)
                continue
            os.replace(tmp, target)  # atomic: concurrent builders never see half a file
            log.info("built the matrix kernel (%s)", " ".join(flags))
        lib = ctypes.CDLL(str(target))
        fn = lib.cv_int8_gemm
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                       ctypes.c_int]
        f32 = lib.cv_f32_gemm
        f32.restype = ctypes.c_int
        f32.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.cv_int8_max_rows.restype = ctypes.c_int
        lib.cv_int8_packed.restype = ctypes.c_int
        lib.cv_int8_embed.restype = ctypes.c_int
        lib.cv_int8_dequant.restype = ctypes.c_int
        lib.cv_int8_dequant.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_void_p]
        lib.cv_int8_embed.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                      ctypes.c_void_p]
        lib.cv_int8_act_block.restype = ctypes.c_int
        lib.cv_f32_simd.restype = ctypes.c_int
        lib.cv_rmsnorm.restype = None
        lib.cv_rmsnorm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int, ctypes.c_int, ctypes.c_float]
        lib.cv_silu_mul.restype = None
        lib.cv_silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_void_p]
        lib.cv_decode_rows.restype = ctypes.c_int
        lib.cv_decode_rows.argtypes = [
            ctypes.POINTER(CLayer), ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(CLinear),
            ctypes.c_float, *[ctypes.c_int] * 5, ctypes.c_void_p, ctypes.c_int,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int, ctypes.c_void_p,
            ctypes.c_int]
        lib.cv_attend_rows.restype = ctypes.c_int
        lib.cv_attend_rows.argtypes = [ctypes.c_void_p, *[ctypes.c_int] * 4, ctypes.c_void_p,
                                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                       *[ctypes.c_int] * 3, ctypes.c_float, ctypes.c_void_p,
                                       ctypes.c_int]
        return lib
    raise ConfigError(f"the matrix kernel did not compile with {cc}: {errors[-1]}; int8 "
                      "weights need it: use dtype float32, or set CC to a working C compiler")


def kernel() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _compile()
        return _lib


class CLinear(ctypes.Structure):
    """cv_linear (ops.c): a linear layer's weight, int8 row scales or NULL, bias or NULL."""
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n_in", ctypes.c_int), ("n_out", ctypes.c_int)]


class CLayer(ctypes.Structure):
    """cv_layer (ops.c): one decoder layer's norms, linear layers and attention window."""
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("qkv", CLinear), ("o", CLinear), ("gate_up", CLinear), ("down", CLinear),
                ("window", ctypes.c_int)]


def kernel_threads() -> int:
    """Threads the calling thread's kernel products use."""
    return getattr(_local, "threads", 0) or torch.get_num_threads()


def float_kernel() -> ctypes.CDLL | None:
    """The kernel, if it builds here and has SIMD code for float32 on this CPU (else
    torch's matmul is the faster choice): None otherwise, never an error."""
    try:
        lib = kernel()
    except ConfigError as e:
        log.debug("no float32 kernel: %s", e)
        return None
    return lib if lib.cv_f32_simd() else None
