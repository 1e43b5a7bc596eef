"""Accelerator utilization and memory for /metrics, read from NVML at scrape time.

Bound with ctypes against libnvidia-ml.so.1, which the NVIDIA driver installs, so there is
no Python dependency. Where the library or a GPU is missing the series are absent, never
zero: a CPU server does not claim an idle GPU. NVML lists every GPU the process can see
(in a container, those the device plugin gave it); CUDA_VISIBLE_DEVICES is not applied.

The loader is injectable: tests pass an object with the same calls as the C library
(`nvmlInit_v2`, ... taking ctypes pointers and returning an nvmlReturn_t).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

NVML_LIBRARY = "libnvidia-ml.so.1"
NVML_SUCCESS = 0


class NVMLUtilization(ctypes.Structure):
    """nvmlUtilization_t: percent of the last sample period the GPU / memory was busy."""

    _fields_ = [("gpu", ctypes.c_uint), ("memory", ctypes.c_uint)]


class NVMLMemory(ctypes.Structure):
    """nvmlMemory_t, in bytes."""

    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


@dataclass(frozen=True)
class GPUSample:
    index: int
    utilization: float | None  # 0..1; None where NVML does not report it (MIG slices)
    memory_used_bytes: int
    memory_total_bytes: int


def load_nvml() -> Any:
    """The NVML library, or None where the driver is not installed."""
    try:
        return ctypes.CDLL(NVML_LIBRARY)
    except OSError:
        return None


class GPUStats:
    """Reads every visible GPU's numbers; initializes NVML once, on the first read."""

    def __init__(self, loader: Callable[[], Any] = load_nvml) -> None:
        self._loader = loader
        self._lib: Any = None
        self._tried = False

    def _nvml(self) -> Any:
        if not self._tried:
            self._tried = True
            try:
                lib = self._loader()
                if lib is not None and lib.nvmlInit_v2() == NVML_SUCCESS:
                    self._lib = lib
                elif lib is not None:
                    logger.info("NVML did not initialize: no GPU metrics")
            except (OSError, AttributeError) as e:
                logger.info("NVML unusable (%s): no GPU metrics", e)
        return self._lib

    def read(self) -> list[GPUSample]:
        lib = self._nvml()
        if lib is None:
            return []
        try:
            return self._read(lib)
        except (OSError, AttributeError) as e:  # a driver without one of the calls
            logger.warning("reading NVML failed: %s", e)
            return []

    @staticmethod
    def _read(lib: Any) -> list[GPUSample]:
        count = ctypes.c_uint(0)
        if lib.nvmlDeviceGetCount_v2(ctypes.pointer(count)) != NVML_SUCCESS:
            return []
        out = []
        for i in range(count.value):
            handle = ctypes.c_void_p()
            mem = NVMLMemory()
            if (lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(i), ctypes.pointer(handle))
                    != NVML_SUCCESS
                    or lib.nvmlDeviceGetMemoryInfo(handle, ctypes.pointer(mem)) != NVML_SUCCESS):
                continue
            util = NVMLUtilization()
            ok = lib.nvmlDeviceGetUtilizationRates(handle, ctypes.pointer(util)) == NVML_SUCCESS
            out.append(GPUSample(i, util.gpu / 100 if ok else None, mem.used, mem.total))
        return out

    def close(self) -> None:
        if self._lib is not None:
            self._lib.nvmlShutdown()
            self._lib = None


class GPUCollector(Collector):
    """gpu_utilization_perc (0..1, like kv_cache_usage_perc), gpu_memory_used_bytes and
    gpu_memory_total_bytes per GPU index, read when scraped."""

    def __init__(self, prefixes: list[str], model: str, stats: GPUStats) -> None:
        self.prefixes = prefixes
        self.model = model
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        # Without this the registry would collect() at registration to learn the names.
        return []

    def collect(self) -> Iterable[Metric]:
        samples = self.stats.read()
        if not samples:
            return
        labels = ["model_name", "gpu"]
        for p in self.prefixes:
            util = GaugeMetricFamily(p + "gpu_utilization_perc",
                                     "GPU busy share over NVML's last sample period (0..1).",
                                     labels=labels)
            used = GaugeMetricFamily(p + "gpu_memory_used_bytes", "GPU memory in use.",
                                     labels=labels)
            total = GaugeMetricFamily(p + "gpu_memory_total_bytes", "GPU memory in all.",
                                      labels=labels)
            for s in samples:
                lv = [self.model, str(s.index)]
                if s.utilization is not None:
                    util.add_metric(lv, s.utilization)
                used.add_metric(lv, float(s.memory_used_bytes))
                total.add_metric(lv, float(s.memory_total_bytes))
            yield util
            yield used
            yield total
