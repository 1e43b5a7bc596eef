"""Linear layers, optionally packing several checkpoint projections into one matmul, with
dense, int8 or int4 weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import quant
from server.model.quantization import QuantConfig

# Tensors of an AWQ checkpoint: (dim the output shards along, output columns per element).
_AWQ_TENSORS = {"qweight": (1, 8), "qzeros": (1, 8), "scales": (1, 1)}


def _onednn_packing_supported(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def _onednn_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of 2^(bit_length - 4): exact below 16, then one of
    8 sizes per power of two (at most 1/8 extra rows)."""
    step = 1 << max(0, rows.bit_length() - 4)
    return -(-rows // step) * step


def warm_onednn_shapes(model: nn.Module, max_rows: int) -> int:
    """Run every pre-packed weight shape once at each padded row count up to `max_rows`.

    oneDNN builds a primitive the first time it sees a (rows, weight shape) pair, shared by
    all layers of that shape: a few ms of latency on the step that meets a new batch size,
    and memory that keeps growing while new sizes turn up. Warming the decode-sized row
    counts at start-up moves both out of serving. Returns the matmuls run.
    """
    shapes: dict[tuple, Linear] = {}
    for module in model.modules():
        if isinstance(module, Linear) and module.packed_weight is not None:
            key = (module.in_features, module.out_features, module.packed_weight.dtype,
                   module.bias is None)
            shapes.setdefault(key, module)
    sizes = sorted({_onednn_rows(r) for r in range(1, max_rows + 1)})
    with torch.inference_mode():
        for module in shapes.values():
            dtype = module.packed_weight.dtype
            for rows in sizes:
                module(torch.zeros(rows, module.in_features, dtype=dtype))
    return len(shapes) * len(sizes)


class Linear(nn.Module):
    """y = x W^T (+ b), W of shape [sum(output_sizes), in_features].

    A packed layer (fused q/k/v, gate/up) concatenates the outputs of the checkpoint's
    separate projections `shard_names`, which the loader fills one by one through
    `load_weight`. Parameters are allocated uninitialized: weights always come from a file.
    After loading, `process_weights_after_loading` quantizes W when `quant` says so (int8
    per channel, int4 per group; see kernels.quant for the layouts), or on CPU may swap W for
    a oneDNN pre-packed copy. With `quant.from_awq` the layer holds the checkpoint's AWQ
    tensors (qweight, qzeros, scales) from the start and never a dense W.
    """

    def __init__(self, in_features: int, output_sizes: int | Sequence[int], bias: bool = False,
                 shard_names: Sequence[str] | None = None,
                 dtype: torch.dtype | None = None, quant: QuantConfig | None = None) -> None:
        super().__init__()
        sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
        if shard_names is not None and len(shard_names) != len(sizes):
            raise ValueError("shard_names must name one checkpoint tensor per output size")
        self.in_features = in_features
        self.output_sizes = sizes
        self.out_features = sum(sizes)
        self.shard_names = tuple(shard_names) if shard_names is not None else None
        self.quant = quant
        self.bias = (nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False)
                     if bias else None)
        self.packed_weight: torch.Tensor | None = None
        self.qweight: nn.Parameter | None = None
        self.scales: nn.Parameter | None = None
        self.qzeros: nn.Parameter | None = None
        if quant is not None and quant.from_awq:
            self.weight = None
            self._make_awq_params(dtype)
        else:
            self.weight = nn.Parameter(
                torch.empty(self.out_features, in_features, dtype=dtype), requires_grad=False
            )

    def _make_awq_params(self, dtype: torch.dtype | None) -> None:
        assert self.quant is not None
        if any(size % 8 for size in self.output_sizes):
            raise ValueError(f"AWQ int4 needs output sizes divisible by 8, got "
                             f"{self.output_sizes}")
        k, n, g = self.in_features, self.out_features, self.quant.group_size
        groups = -(-k // g)
        shapes = {"qweight": ((k, n // 8), torch.int32), "qzeros": ((groups, n // 8), torch.int32),
                  "scales": ((groups, n), dtype)}
        for name, (shape, dt) in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dt), requires_grad=False))

    def make_dense(self) -> None:
        """Store a dense W after all (a module the AWQ checkpoint left unquantized)."""
        if self.quant is None:
            return
        dtype = self.scales.dtype if self.scales is not None else None
        self.quant = None
        self.qweight = self.scales = self.qzeros = None
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=dtype),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            assert self.scales is not None
            if self.qzeros is None:
                return kernels.int8_linear(x, self.qweight, self.scales, self.bias)
            assert self.quant is not None
            return kernels.int4_linear(x, self.qweight, self.scales, self.qzeros,
                                       self.quant.group_size, self.bias)
        if self.packed_weight is not None:
            return self._onednn_linear(x)
        return F.linear(x, self.weight, self.bias)

    def _onednn_linear(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN builds and keeps a primitive for every distinct row count, so a server
        # seeing every batch size grew by GBs; padding the rows to one of 8 sizes per power
        # of two bounds that to 72 sizes up to 2048 rows, for at most 1/8 extra rows.
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        padded = _onednn_rows(rows)
        if padded != rows:
            x2 = F.pad(x2, (0, 0, 0, padded - rows))
        out = torch.ops.mkldnn._linear_pointwise(x2, self.packed_weight, self.bias, "none",
                                                 [], "")
        return out[:rows].view(*x.shape[:-1], out.shape[-1])

    def process_weights_after_loading(self, keep_dense: bool = False) -> None:
        """Quantize W, or pre-pack it for oneDNN (CPU fp32/bf16) so each matmul stops
        re-laying it out (worth ~1.4x on the decode matmuls).

        The dense W is dropped unless `keep_dense` (a weight shared with another module,
        e.g. tied embeddings, must stay).
        """
        if self.quant is not None:
            self._quantize()
            return
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

    def _quantize(self) -> None:
        assert self.quant is not None
        if self.quant.from_awq:
            assert self.qweight is not None and self.qzeros is not None
            # AWQ interleaves the 8 nibbles of each int32; our kernels read them in order.
            self.qweight.data = quant.awq_to_natural(self.qweight.data)
            self.qzeros.data = quant.awq_to_natural(self.qzeros.data)
            return
        assert self.weight is not None
        w = self.weight.data
        if self.quant.method == "int8":
            q, s = quant.quantize_int8(w)
            self.qweight = nn.Parameter(q, requires_grad=False)
            self.scales = nn.Parameter(s, requires_grad=False)
        else:
            q, s, z = quant.quantize_int4(w, self.quant.group_size)
            self.qweight = nn.Parameter(q, requires_grad=False)
            self.scales = nn.Parameter(s, requires_grad=False)
            self.qzeros = nn.Parameter(z, requires_grad=False)
        self.weight = None

    def load_weight(self, param_name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        """Copy a checkpoint tensor into the whole parameter or into output shard `shard`."""
        param = getattr(self, param_name)
        if param is None:
            raise RuntimeError(f"{param_name} was already packed; load weights before packing")
        if shard is None:
            target = param.data
        else:
            dim, per_elem = _AWQ_TENSORS.get(param_name, (0, 1))
            start = sum(self.output_sizes[:shard]) // per_elem
            target = param.data.narrow(dim, start, self.output_sizes[shard] // per_elem)
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch loading {param_name} (shard {shard}): checkpoint has "
                f"{tuple(tensor.shape)}, model expects {tuple(target.shape)}"
            )
        target.copy_(tensor)

    def extra_repr(self) -> str:
        q = "" if self.quant is None else f", quant={self.quant.method}"
        return (f"in_features={self.in_features}, output_sizes={self.output_sizes}, "
                f"bias={self.bias is not None}{q}")
