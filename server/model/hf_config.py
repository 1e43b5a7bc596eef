"""A Hugging Face config.json normalized into the few numbers our model code needs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain rope, else a dict with "rope_type" (linear | llama3 | yarn) and its knobs.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    # Bias on q/k/v (Qwen2 always; Llama/Qwen3 when attention_bias), on o_proj, on the MLP.
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # Per-layer "full_attention" / "sliding_attention", when the config lists them.
    layer_types: tuple[str, ...] | None = None
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_sliding_window(self, layer: int) -> int | None:
        """The attention window of one layer (None = full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_config_json(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model directory, with clear errors when it is not one."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist")
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(model_dir)!r} has no config.json; is it a Hugging Face model directory?"
        )
    return _read_json(path)


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers-5 `rope_parameters` or older rope_theta/rope_scaling."""
    params = dict(cfg.get("rope_parameters") or {})
    old = cfg.get("rope_scaling") or {}
    params = {**old, **params}
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def arch_config_from_dict(cfg: dict[str, Any]) -> ModelArchConfig:
    """Normalize a parsed config.json (its text_config if it nests one)."""
    archs = cfg.get("architectures") or []
    if not archs:
        raise ValueError("config.json lists no 'architectures'")
    if "text_config" in cfg:
        cfg = {**cfg["text_config"], "architectures": archs}
    arch = archs[0]
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise ValueError(f"unsupported hidden_act {act!r}: only 'silu' MLPs are implemented")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg)
    is_qwen2 = arch == "Qwen2ForCausalLM"
    attn_bias = bool(cfg.get("attention_bias", False))
    # Qwen configs keep a `sliding_window` value even when `use_sliding_window` is off (their
    # default); Mistral has no switch. Qwen slides only from layer max_window_layers on.
    window = cfg.get("sliding_window")
    if not cfg.get("use_sliding_window", not arch.startswith("Qwen")):
        window = None
    layer_types = cfg.get("layer_types")
    if window and not layer_types and "max_window_layers" in cfg:
        layer_types = ["sliding_attention" if i >= cfg["max_window_layers"] else "full_attention"
                       for i in range(int(cfg["num_hidden_layers"]))]
    return ModelArchConfig(
        architecture=arch,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=is_qwen2 or attn_bias,
        o_proj_bias=attn_bias and not is_qwen2,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        sliding_window=int(window) if window else None,
        layer_types=tuple(layer_types) if layer_types else None,
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_ids(cfg.get("eos_token_id")),
    )


def read_arch_config(path: str | Path) -> ModelArchConfig:
    """ModelArchConfig of a model directory (or of a config.json file)."""
    path = Path(path)
    cfg = _read_json(path) if path.is_file() else load_config_json(path)
    return arch_config_from_dict(cfg)


def read_eos_token_ids(path: str | Path) -> frozenset[int]:
    """End-of-sequence ids: generation_config.json's if it names any, else config.json's."""
    path = Path(path)
    gen = path / "generation_config.json"
    if gen.is_file():
        ids = _as_ids(_read_json(gen).get("eos_token_id"))
        if ids:
            return frozenset(ids)
    return frozenset(_as_ids(load_config_json(path).get("eos_token_id")))
