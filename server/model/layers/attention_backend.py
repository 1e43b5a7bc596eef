"""The attention backend interface and its registry, chosen by name."""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from types import MappingProxyType

import torch

from server.model.attn_metadata import AttentionMetadata

logger = logging.getLogger(__name__)

# name -> "module:Class"; a new backend is one more line here.
_BACKENDS = MappingProxyType({
    "torch": "server.model.layers.torch_attention:TorchAttentionBackend",
    "cpu": "server.model.layers.cpu_attention:CpuAttentionBackend",
    "triton": "server.model.layers.triton_attention:TritonAttentionBackend",
})


class AttentionBackend(ABC):
    """Paged attention for one model; one instance is shared by all its layers.

    Contract of `forward`, per layer and step:
    - first store this step's key/value rows at attn_metadata.slot_mapping in `kv_cache`
      ([2, num_blocks, block_size, num_kv_heads, head_dim]);
    - then attend each query row to its request's context read back through block_tables,
      so a block written this step by another request of the batch is visible;
    - row i of request r sits at position seq_lens[r] - query_len[r] + i and sees keys at
      positions <= its own, within `sliding_window` when given;
    - rows past num_actual_tokens (padding) are neither written nor attended; their
      output is zero.
    """

    name: str = ""

    @abstractmethod
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        """query [T, Hq, D], key/value [T, Hkv, D] -> attention output [T, Hq, D]."""


def supported_attention_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """"auto": Triton on CUDA; on CPU the native C++ kernel when it builds, else the torch
    reference. An explicit backend that cannot run on `device` is an error, not a fallback."""
    if name not in ("auto", *_BACKENDS):
        raise ValueError(
            f"unknown attention backend {name!r}; available: auto, {', '.join(_BACKENDS)}"
        )
    if name == "triton":
        from kernels.triton_utils import triton_supported

        if not triton_supported(device):
            raise ValueError(
                f"attention_backend='triton' cannot run on {device.type}: Triton kernels need "
                "a CUDA GPU (or TRITON_INTERPRET=1 to interpret them on the CPU, slowly); "
                "use 'auto', 'torch' or 'cpu'"
            )
        return name
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"attention_backend='cpu' cannot run on {device.type}; use 'auto'")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "triton"
    if device.type == "cpu":
        from kernels import cpu_native

        if cpu_native.enabled():  # builds it on first use; CONVEYOR_NATIVE_CPU=0 opts out
            return "cpu"
        if cpu_native.requested():
            logger.warning("native CPU attention unavailable (%s); using the torch reference",
                           cpu_native.build_error())
    return "torch"


def get_attention_backend(name: str) -> AttentionBackend:
    """A new instance of the backend registered as `name`."""
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; available: {', '.join(_BACKENDS)}"
        )
    module, cls = _BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
