"""Per-step attention metadata, built by the runner and passed explicitly to every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes one flattened varlen batch.

    The runner orders requests so that decode rows (query length 1) come first, then
    prefill / chunked-prefill rows. Token i of the batch belongs to the request r with
    query_start_loc[r] <= i < query_start_loc[r+1]; its position in that sequence is
    seq_lens[r] - query_len[r] + (i - query_start_loc[r]).
    """

    num_actual_tokens: int
    # [num_tokens] int64: flat KV slot (block_id * block_size + offset) of each new token.
    slot_mapping: torch.Tensor
    # [num_seqs + 1] int32 cumulative query lengths, and its Python copy.
    query_start_loc: torch.Tensor
    query_start_loc_cpu: list[int]
    # [num_seqs] int32 context length after this step (cached + new tokens), and Python copy.
    seq_lens: torch.Tensor
    seq_lens_cpu: list[int]
    # [num_seqs, max_num_blocks] int32 physical block ids (padded with 0).
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    # The first num_decodes requests have query length 1 (num_decode_tokens == num_decodes).
    num_decodes: int
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)
