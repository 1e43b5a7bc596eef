"""Dense linear layers, optionally packing several checkpoint projections into one matmul."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_packing_supported(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


class Linear(nn.Module):
    """y = x W^T (+ b), W of shape [sum(output_sizes), in_features].

    A packed layer (fused q/k/v, gate/up) concatenates the outputs of the checkpoint's
    separate projections `shard_names`, which the loader fills one by one through
    `load_weight`. Parameters are allocated uninitialized: weights always come from a file.
    On CPU, `process_weights_after_loading` may swap W for a oneDNN pre-packed copy.
    """

    def __init__(self, in_features: int, output_sizes: int | Sequence[int], bias: bool = False,
                 shard_names: Sequence[str] | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        if shard_names is not None and len(shard_names) != len(sizes):
            raise ValueError("shard_names must name one checkpoint tensor per output size")
        self.in_features = in_features
        self.output_sizes = sizes
        self.out_features = sum(sizes)
        self.shard_names = tuple(shard_names) if shard_names is not None else None
        self.weight = nn.Parameter(
            torch.empty(self.out_features, in_features, dtype=dtype), requires_grad=False
        )
        self.bias = (nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.packed_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)

    def process_weights_after_loading(self, keep_dense: bool = False) -> None:
        """Pre-pack W for oneDNN (CPU fp32/bf16), so each matmul stops re-laying it out.

        Worth ~1.4x on the decode matmuls. The dense W is dropped unless `keep_dense`
        (a weight shared with another module, e.g. tied embeddings, must stay).
        """
        weight = self.weight
        if weight is None:
            return
        try:
            if not _onednn_packing_supported(weight):
                return
            # The batch-size argument is only a blocking hint; any batch size works after.
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)
        except (RuntimeError, AttributeError):  # a torch build without these private ops
            return
        if not keep_dense:
            self.weight = None

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        """Copy a checkpoint tensor into the whole parameter or into output shard `shard`."""
        param = getattr(self, param_name)
        if param is None:
            raise RuntimeError(f"{param_name} was already packed; load weights before packing")
        if shard is None:
            target = param.data
        else:
            start = sum(self.output_sizes[:shard])
            target = param.data.narrow(0, start, self.output_sizes[shard])
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch loading {param_name} (shard {shard}): checkpoint has "
                f"{tuple(tensor.shape)}, model expects {tuple(target.shape)}"
            )
        target.copy_(tensor)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, output_sizes={self.output_sizes}, "
                f"bias={self.bias is not None}")
