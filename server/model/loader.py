"""Build a model from a Hugging Face directory: config.json + safetensors (sharded or not)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from server.model.hf_config import ModelArchConfig, arch_config_from_dict, load_config_json
from server.model.layers.linear import Linear
from server.model.quantization import QuantConfig, resolve_quant_config
from server.model.registry import get_model_class

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Checkpoint tensors we recompute instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# checkpoint tensor name -> (module, parameter name, output shard of a packed Linear)
Targets = dict[str, tuple[nn.Module, str, int | None]]


def resolve_dtype(dtype: str, checkpoint_dtype: str | None) -> torch.dtype:
    """"auto" -> the checkpoint's dtype (float32 if unknown), else the named dtype."""
    if dtype == "auto":
        return _DTYPES.get(str(checkpoint_dtype).removeprefix("torch."), torch.float32)
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected auto or one of {list(_DTYPES)}")
    return _DTYPES[dtype]


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the weights, from the shard index when there is one."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(
            p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {others}; only safetensors are supported)" if others else ""
        raise FileNotFoundError(f"no *.safetensors weights in {str(model_dir)!r}{hint}")
    return files


def _tensor_names(files: list[Path]) -> dict[Path, list[str]]:
    names = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names[path] = list(f.keys())
    return names


def _load_targets(model: nn.Module) -> Targets:
    """Where each checkpoint tensor goes; tied parameters are listed once, first owner wins."""
    targets: Targets = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, Linear) and module.shard_names is not None:
                parent = mod_name.rpartition(".")[0]
                parent = f"{parent}." if parent else ""
                for i, shard in enumerate(module.shard_names):
                    targets[f"{parent}{shard}.{pname}"] = (module, pname, i)
            else:
                targets[f"{prefix}{pname}"] = (module, pname, None)
    return targets


def _copy_into(module: nn.Module, pname: str, shard: int | None, tensor: torch.Tensor,
               name: str) -> None:
    if isinstance(module, Linear):
        module.load_weight(pname, tensor, shard)
        return
    param = getattr(module, pname)
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"shape mismatch for {name}: checkpoint has {tuple(tensor.shape)}, "
                         f"model expects {tuple(param.shape)}")
    param.data.copy_(tensor)


def load_weights(model: nn.Module, files: dict[Path, list[str]],
                 show_progress: bool = True) -> None:
    """Copy every checkpoint tensor into `model` (casting dtype); error on a missing one."""
    targets = _load_targets(model)
    tied = bool(getattr(getattr(model, "arch", None), "tie_word_embeddings", False))
    loaded: set[str] = set()
    total = sum(len(n) for n in files.values())
    with tqdm(total=total, desc="Loading weights", unit="tensor",
              disable=not show_progress) as bar:
        for path, names in files.items():
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    bar.update(1)
                    if name not in targets:
                        if not (name.endswith(_IGNORED_SUFFIXES)
                                or (tied and name == "lm_head.weight")):
                            logger.warning("ignoring unexpected checkpoint tensor %s", name)
                        continue
                    module, pname, shard = targets[name]
                    _copy_into(module, pname, shard, f.get_tensor(name), name)
                    loaded.add(name)
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                          else "")
        raise ValueError(f"checkpoint is missing required weight(s): {shown}")


def process_weights_after_loading(model: nn.Module, pack: bool = True) -> None:
    """Let each Linear quantize its weight, or (`pack`) re-lay it out for the device;
    shared weights are kept."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    for module in model.modules():
        if not isinstance(module, Linear) or not (pack or module.quant is not None):
            continue
        shared = module.weight is not None and owners[id(module.weight)] > 1
        module.process_weights_after_loading(keep_dense=shared)


def load_model(
    model_dir: str | Path, dtype: str = "auto", device: torch.device | str = "cpu",
    attention_backend: str = "torch", show_progress: bool = True, pack_weights: bool = True,
    quantization: str | None = None,
) -> tuple[nn.Module, ModelArchConfig, torch.dtype]:
    """(model in eval mode on `device`, its normalized config, the dtype of its weights).

    `pack_weights=False` keeps plain dense Linear weights (for inspecting or comparing them).
    `quantization` ("int8", "int4", "awq" or None) is reconciled with the checkpoint's own
    quantization_config; the result is `model.quant`.
    """
    model_dir = Path(model_dir)
    raw = load_config_json(model_dir)
    arch = arch_config_from_dict(raw)
    model_cls = get_model_class(arch.architecture)
    files = _tensor_names(weight_files(model_dir))
    has_lm_head = any("lm_head.weight" in names for names in files.values())
    if not has_lm_head and "tie_word_embeddings" not in raw:
        # Older configs rely on the library default (tied) instead of stating it.
        arch = dataclasses.replace(arch, tie_word_embeddings=True)
    torch_dtype = resolve_dtype(dtype, arch.torch_dtype)
    quant = resolve_quant_config(quantization, raw)
    with torch.device(device):
        model = model_cls(arch, dtype=torch_dtype, attention_backend=attention_backend,
                          quant=quant)
        if quant is not None:
            _keep_skipped_dense(model, quant)
    load_weights(model, files, show_progress=show_progress)
    process_weights_after_loading(model, pack=pack_weights)
    return model.eval(), arch, torch_dtype


def _keep_skipped_dense(model: nn.Module, quant: QuantConfig) -> None:
    for name, module in model.named_modules():
        if isinstance(module, Linear) and not quant.applies_to(name):
            module.make_dense()
