"""The "torch" attention backend: kernels.reference ops, fast enough to serve on CPU."""

from __future__ import annotations

import torch

from kernels import reference
from server.model.attn_metadata import AttentionMetadata
from server.model.layers.attention_backend import AttentionBackend


class TorchAttentionBackend(AttentionBackend):
    """Decode rows in one batched SDPA call per layer, prefill rows one SDPA per request."""

    name = "torch"

    def __init__(self) -> None:
        # Layers run one after another, so they can share the decode gather buffer.
        self._workspace = reference.Workspace()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        md = attn_metadata
        n, total = md.num_actual_tokens, query.shape[0]
        padded = n < total
        if padded:
            query, key, value = query[:n], key[:n], value[:n]
        reference.write_kv(key, value, kv_cache, md.slot_mapping[:n])
        out = reference.paged_attention(
            query, kv_cache, md.query_start_loc_cpu, md.seq_lens_cpu, md.block_tables, scale,
            sliding_window=sliding_window, num_decodes=md.num_decodes,
            workspace=self._workspace,
        )
        if padded:
            full = out.new_zeros(total, *out.shape[1:])
            full[:n] = out
            return full
        return out
