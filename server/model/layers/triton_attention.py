"""The "triton" attention backend: one varlen Triton launch per layer for the mixed batch.

Runs natively on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (how CI tests it).
"""

from __future__ import annotations

import torch

from kernels import triton_attention, triton_kv_write
from server.model.attn_metadata import AttentionMetadata
from server.model.layers.attention_backend import AttentionBackend


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        md = attn_metadata
        n = md.num_actual_tokens
        triton_kv_write.write_kv(key[:n], value[:n], kv_cache, md.slot_mapping[:n])
        # The kernel writes only real rows; padding rows must read as zeros.
        out = torch.zeros_like(query) if n < query.shape[0] else torch.empty_like(query)
        triton_attention.paged_attention(
            query, kv_cache, md.query_start_loc, md.seq_lens, md.block_tables, scale,
            max_query_len=md.max_query_len, max_seq_len=md.max_seq_len,
            sliding_window=sliding_window, out=out,
        )
        return out
