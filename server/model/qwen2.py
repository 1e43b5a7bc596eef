"""Qwen2: the Llama decoder with biases on the q/k/v projections."""

from __future__ import annotations

import torch

from server.model.hf_config import ModelArchConfig
from server.model.layers.attention_backend import AttentionBackend
from server.model.llama import LlamaForCausalLM
from server.model.quantization import QuantConfig


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ModelArchConfig, dtype: torch.dtype = torch.float32,
                 attention_backend: str | AttentionBackend = "torch",
                 quant: QuantConfig | None = None) -> None:
        if not arch.attention_bias:
            raise ValueError("Qwen2 checkpoints carry q/k/v biases; the config says none")
        super().__init__(arch, dtype, attention_backend, quant)
