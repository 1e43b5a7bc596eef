"""CPU-native ops compiled on first use with torch's C++ extension builder.

Compiled for this machine (-march=native) into torch's extension cache, so the cost
(about a minute) is paid once per machine. `available()` says whether it builds here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from types import ModuleType

import torch

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "cpu_ops.cpp", _CSRC / "paged_decode_cpu.cpp", _CSRC / "fused_ops_cpu.cpp"]
# Vectorized fp32 reductions need reassociation; unlike -ffast-math these flags keep
# infinities, which the online softmax relies on.
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fassociative-math",
           "-fno-signed-zeros", "-fno-trapping-math"]


@functools.cache
def _load() -> ModuleType:
    from torch.utils.cpp_extension import load

    return load(name="conveyor_cpu_ops", sources=[str(p) for p in _SOURCES], extra_cflags=_CFLAGS,
                extra_ldflags=["-fopenmp"], verbose=False)


@functools.cache
def available() -> bool:
    """True when the extension compiles and loads on this machine."""
    try:
        _load()
    except Exception:  # no compiler, no ninja, no headers: callers use the reference
        return False
    return True


def requested() -> bool:
    """False when CONVEYOR_NATIVE_CPU=0 opts out of the native ops."""
    return os.environ.get("CONVEYOR_NATIVE_CPU", "1") != "0"


def enabled() -> bool:
    """Use the native ops on CPU unless CONVEYOR_NATIVE_CPU=0 or they do not build."""
    return requested() and available()


def build_error() -> str | None:
    try:
        _load()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over its paged K/V; writes `out`.

    query/out [N, Hq, D], kv_cache [2, num_blocks, block_size, Hkv, D] (same dtype),
    block_tables int32 [N, max_blocks], seq_lens int32 [N] (context including the token).
    """
    _load().paged_decode_attention(out, query, kv_cache, block_tables, seq_lens, float(scale),
                                   int(sliding_window or 0))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Same contract and rounding as `reference.rms_norm`, for 2-D x."""
    outs = _load().rms_norm(x, weight, float(eps), residual)
    return outs[0] if residual is None else (outs[0], outs[1])


def rotary_neox(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                cos_sin_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference.rotary_embedding` with is_neox=True."""
    q, k = _load().rotary_neox(positions, query, key, cos_sin_cache, head_dim)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.silu_and_mul` for 2-D x."""
    return _load().silu_and_mul(x)
