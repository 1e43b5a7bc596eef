"""Timing for kernel benchmarks: per-call device time, cache flushed between calls.

On CUDA each call is bracketed by events after a write that evicts L2, so weight-streaming
kernels are measured from HBM rather than from a warm cache; on CPU (the Triton
interpreter, smoke runs only) wall time is used.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Timer:
    def __init__(self, device: torch.device, flush_bytes: int = 256 << 20) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = (torch.empty(flush_bytes // 4, dtype=torch.float32, device=device)
                       if self.cuda else None)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def median_ms(self, fn: Callable[[], object], reps: int = 20, warmup: int = 3,
                  flush: bool = True) -> float:
        """Median milliseconds of `fn` over `reps` calls (after `warmup` untimed ones)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                if flush and self._flush is not None:
                    self._flush.zero_()
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def copy_bandwidth_gbs(self, nbytes: int = 1 << 30) -> float:
        """Device-to-device copy bandwidth (bytes read + written per second), the yardstick
        for memory-bound kernels."""
        src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=self.device)
        dst = torch.empty_like(src)
        ms = self.median_ms(lambda: dst.copy_(src), reps=10, flush=False)
        return 2 * nbytes / (ms * 1e-3) / 1e9
