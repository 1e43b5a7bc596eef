"""Mistral: the Llama decoder with an optional sliding attention window (from the config)."""

from __future__ import annotations

from server.model.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    """Identical modules; `ModelArchConfig.sliding_window` reaches every attention layer."""
