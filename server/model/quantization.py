"""Which weight-only quantization a model loads with: the user's request and the checkpoint's
own `quantization_config`, reconciled once at load time."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

QUANTIZATION_CHOICES = ("int8", "int4", "awq")
DEFAULT_INT4_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantConfig:
    """How the decoder's linear layers store their weights.

    int8: per-output-channel symmetric scales. int4: per-group (along the input dim) scales and
    zero points, 8 values packed per int32. `from_awq` means the checkpoint already holds AWQ
    int4 tensors (qweight / qzeros / scales) instead of dense weights.
    """

    method: str
    group_size: int = DEFAULT_INT4_GROUP_SIZE
    from_awq: bool = False
    # Module name fragments the checkpoint left dense (AWQ's modules_to_not_convert).
    skip_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in ("int8", "int4"):
            raise ValueError(f"unknown quantization method {self.method!r}")
        if self.method == "int4" and (self.group_size < 8 or self.group_size & 7):
            raise ValueError(f"int4 group_size must be a multiple of 8, got {self.group_size}")

    def applies_to(self, module_name: str) -> bool:
        return not any(s in module_name for s in self.skip_modules)


def _awq_config(qc: Mapping[str, Any]) -> QuantConfig:
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", DEFAULT_INT4_GROUP_SIZE)))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4:
        raise ValueError(f"AWQ checkpoints with {bits}-bit weights are not supported (4 only)")
    if not qc.get("zero_point", True):
        raise ValueError("AWQ checkpoints without zero points are not supported")
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (the GEMM layout only)")
    return QuantConfig("int4", group_size=group, from_awq=True,
                       skip_modules=tuple(qc.get("modules_to_not_convert") or ()))


def resolve_quant_config(requested: str | None, hf_config: Mapping[str, Any]) -> QuantConfig | None:
    """The user's `quantization` (None, "int8", "int4", "awq") against the checkpoint's."""
    if requested is not None and requested not in QUANTIZATION_CHOICES:
        raise ValueError(f"unknown quantization {requested!r}; expected one of "
                         f"{', '.join(QUANTIZATION_CHOICES)} or none")
    qc = hf_config.get("quantization_config")
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, Mapping) else ""
    if method:
        if method != "awq":
            raise ValueError(f"checkpoint quantization {method!r} is not supported; Conveyor "
                             "loads dense checkpoints (optionally quantizing them) and AWQ int4")
        if requested == "int8":
            raise ValueError("this checkpoint is already AWQ int4; it cannot be loaded as int8")
        assert isinstance(qc, Mapping)
        return _awq_config(qc)
    if requested == "awq":
        raise ValueError("quantization='awq' needs an AWQ checkpoint (quantization_config with "
                         "quant_method 'awq' in config.json); use 'int4' to quantize this one")
    if requested is None:
        return None
    return QuantConfig(requested)


def describe(qc: QuantConfig | None) -> str:
    if qc is None:
        return "none"
    if qc.method == "int8":
        return "int8 (per-channel)"
    return f"int4 g{qc.group_size}" + (" (AWQ checkpoint)" if qc.from_awq else "")
