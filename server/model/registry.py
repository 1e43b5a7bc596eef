"""Hugging Face architecture name -> our model class."""

from __future__ import annotations

import importlib
from types import MappingProxyType

from torch import nn

# Imported on demand so that asking what is supported loads no model code.
_MODELS = MappingProxyType({
    "LlamaForCausalLM": "server.model.llama",
    "MistralForCausalLM": "server.model.mistral",
    "Qwen2ForCausalLM": "server.model.qwen2",
    "Qwen3ForCausalLM": "server.model.qwen3",
})


def supported_architectures() -> tuple[str, ...]:
    return tuple(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(
            f"unsupported architecture {architecture!r}; supported: "
            f"{', '.join(supported_architectures())}"
        )
    return getattr(importlib.import_module(_MODELS[architecture]), architecture)
