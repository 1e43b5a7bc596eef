"""The "cpu" attention backend: a native C++ decode kernel that reads the paged cache
directly, and the torch reference for prefill rows (which are compute-bound anyway)."""

from __future__ import annotations

import torch

from kernels import cpu_native, reference
from server.model.attn_metadata import AttentionMetadata
from server.model.layers.attention_backend import AttentionBackend


class CpuAttentionBackend(AttentionBackend):
    name = "cpu"

    def __init__(self) -> None:
        if not cpu_native.available():
            raise RuntimeError(
                "the 'cpu' attention backend needs its C++ extension, which failed to build: "
                f"{cpu_native.build_error()}; use attention_backend='torch'"
            )
        # Layers run one after another, so they can share the prefill context buffer.
        self._workspace = reference.Workspace()

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata, scale: float,
                sliding_window: int | None = None) -> torch.Tensor:
        md = attn_metadata
        n = md.num_actual_tokens
        reference.write_kv(key[:n], value[:n], kv_cache, md.slot_mapping[:n])
        out = torch.zeros_like(query) if n < query.shape[0] else torch.empty_like(query)
        nd = md.num_decodes
        if nd:
            cpu_native.paged_decode_attention(
                out[:nd], query[:nd].contiguous(), kv_cache, md.block_tables[:nd].contiguous(),
                md.seq_lens[:nd], scale, sliding_window,
            )
        if nd < md.num_seqs:
            qsl = md.query_start_loc_cpu
            reference.paged_attention(
                query[qsl[nd]:n], kv_cache, [x - qsl[nd] for x in qsl[nd:]],
                md.seq_lens_cpu[nd:], md.block_tables[nd:], scale,
                sliding_window=sliding_window, out=out[qsl[nd]:n], workspace=self._workspace,
            )
        return out
