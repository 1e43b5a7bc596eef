"""Per-request state the runner keeps between steps, and the flattened batch it builds."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from server.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    generator: torch.Generator | None
    block_ids: list[int]
    num_computed_tokens: int
    # Prompt logprobs accumulated over prefill chunks are returned per chunk, not kept.
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)


@dataclass
class FlatBatch:
    """The requests of one step in runner order (query length 1 first), flattened."""

    states: list[CachedRequestState]
    query_lens: np.ndarray  # [num_seqs]
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    slot_mapping: torch.Tensor  # [num_tokens]
    query_start_loc: np.ndarray  # [num_seqs + 1]
    seq_lens: np.ndarray  # [num_seqs]
    block_tables: torch.Tensor  # [num_seqs, max_blocks]
    num_decodes: int


def build_flat_batch(
    states: list[CachedRequestState], num_scheduled: list[int], block_size: int
) -> FlatBatch:
    """Flatten the scheduled tokens of `states` (already in runner order)."""
    query_lens = np.asarray(num_scheduled, dtype=np.int64)
    starts = np.asarray([s.num_computed_tokens for s in states], dtype=np.int64)
    seq_lens = starts + query_lens
    qsl = np.zeros(len(states) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=qsl[1:])
    total = int(qsl[-1])

    # Positions: for each token, its request's start plus its offset within the chunk.
    req_of_token = np.repeat(np.arange(len(states)), query_lens)
    positions = np.arange(total, dtype=np.int64) - np.repeat(qsl[:-1], query_lens) + \
        starts[req_of_token]
    input_ids = np.empty(total, dtype=np.int64)
    max_blocks = max(len(s.block_ids) for s in states)
    block_tables = np.zeros((len(states), max_blocks), dtype=np.int64)
    for i, s in enumerate(states):
        a, b = int(starts[i]), int(seq_lens[i])
        if b - a == 1:
            input_ids[qsl[i]] = s.token_ids[a]
        else:
            input_ids[qsl[i]:qsl[i + 1]] = s.token_ids[a:b]
        block_tables[i, :len(s.block_ids)] = s.block_ids
    block_of_token = block_tables[req_of_token, positions // block_size]
    slot_mapping = block_of_token * block_size + positions % block_size
    # Callers put every query-length-1 row first, so they are exactly the decode rows.
    num_decodes = int((query_lens == 1).sum())
    return FlatBatch(
        states=states,
        query_lens=query_lens,
        input_ids=torch.from_numpy(input_ids),
        positions=torch.from_numpy(positions),
        slot_mapping=torch.from_numpy(slot_mapping),
        query_start_loc=qsl,
        seq_lens=seq_lens,
        block_tables=torch.from_numpy(block_tables.astype(np.int32)),
        num_decodes=num_decodes,
    )
