"""Per-step sampling tensors, built from per-row Python values.

One row is one request being sampled this step. Only the tensors some row needs are built,
so a plain greedy batch costs a handful of Python comparisons and no device work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import torch

from server.sampling_params import SamplingParams, SamplingType


@dataclass
class PenaltyData:
    """Penalties for the subset of rows that asked for any (indices into the batch)."""

    rows: torch.Tensor  # LongTensor[P]
    # Repetition penalty over prompt + output tokens; None when every row has 1.0.
    repetition: torch.Tensor | None  # [P, 1]
    seen_rows: torch.Tensor | None  # flat (row in 0..P, token) pairs of prompt + output
    seen_tokens: torch.Tensor | None
    # Frequency / presence penalties over output tokens; None when all are 0.
    frequency: torch.Tensor | None  # [P, 1]
    presence: torch.Tensor | None  # [P, 1]
    output_rows: torch.Tensor | None
    output_tokens: torch.Tensor | None


@dataclass
class SamplingMetadata:
    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    # [R] bool, set only when greedy and random rows are mixed.
    greedy_mask: torch.Tensor | None = None
    # [R, 1] float; None when no random row has temperature != 1. Greedy rows hold 1.0.
    temperature: torch.Tensor | None = None
    # [R] long, disabled rows hold vocab_size; max_top_k is the largest enabled k.
    top_k: torch.Tensor | None = None
    max_top_k: int = 0
    top_p: torch.Tensor | None = None  # [R] float, 1.0 where disabled
    min_p: torch.Tensor | None = None  # [R, 1] float, 0.0 where disabled
    # Random rows split by how they sample (ascending row indices, None when empty):
    # plain rows draw from the whole distribution, truncated rows have top-k or top-p.
    plain_rows: torch.Tensor | None = None  # LongTensor
    truncated_rows: torch.Tensor | None = None  # LongTensor
    # Row -> the request's own generator, for seeded random rows only.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # Sparse (row, token) -> additive bias.
    bias_rows: torch.Tensor | None = None
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    # Sparse (row, token) pairs masked to -inf because min_tokens is not reached yet.
    min_tokens_rows: torch.Tensor | None = None
    min_tokens_tokens: torch.Tensor | None = None
    penalties: PenaltyData | None = None
    # Largest number of top logprobs any row wants; None when no row wants logprobs.
    max_num_logprobs: int | None = None

    @property
    def needs_logit_processing(self) -> bool:
        return (self.bias_rows is not None or self.min_tokens_rows is not None
                or self.penalties is not None)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        eos_token_ids: list[frozenset[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        n = len(params)
        greedy = [p.sampling_type == SamplingType.GREEDY for p in params]
        all_greedy = all(greedy)
        all_random = not any(greedy)
        meta = cls(num_rows=n, vocab_size=vocab_size, all_greedy=all_greedy,
                   all_random=all_random)

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        if wanted:
            meta.max_num_logprobs = min(max(wanted), vocab_size)

        if not all_greedy:
            _build_random(meta, params, greedy, generators, device)
        _build_bias(meta, params, device)
        _build_min_tokens(meta, params, output_token_ids, eos_token_ids, device)
        if any(p.needs_penalties for p in params):
            meta.penalties = _build_penalties(params, prompt_token_ids, output_token_ids, device)
        return meta


def _column(values: list[float], device: torch.device | str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _build_random(meta: SamplingMetadata, params: list[SamplingParams], greedy: list[bool],
                  generators: list[torch.Generator | None], device: torch.device | str) -> None:
    vocab = meta.vocab_size
    if not meta.all_random:
        meta.greedy_mask = torch.tensor(greedy, dtype=torch.bool, device=device)
    # Greedy rows (None here) get neutral values: their result is replaced by the argmax.
    rand = [None if g else p for p, g in zip(params, greedy, strict=True)]
    temps = [1.0 if p is None else p.temperature for p in rand]
    if any(t != 1.0 for t in temps):
        meta.temperature = _column(temps, device)
    ks = [p.top_k if p is not None and 0 < p.top_k < vocab else vocab for p in rand]
    enabled = [k for k in ks if k < vocab]
    if enabled:
        meta.top_k = torch.tensor(ks, dtype=torch.long, device=device)
        meta.max_top_k = max(enabled)
    ps = [1.0 if p is None else p.top_p for p in rand]
    if any(p < 1.0 for p in ps):
        meta.top_p = torch.tensor(ps, dtype=torch.float32, device=device)
    mins = [0.0 if p is None else p.min_p for p in rand]
    if any(m > 0.0 for m in mins):
        meta.min_p = _column(mins, device)
    # Built here from Python values so the sampler never syncs to find them.
    cut = [k < vocab or p < 1.0 for k, p in zip(ks, ps, strict=True)]
    plain = [i for i, p in enumerate(rand) if p is not None and not cut[i]]
    truncated = [i for i, p in enumerate(rand) if p is not None and cut[i]]
    if plain:
        meta.plain_rows = torch.tensor(plain, dtype=torch.long, device=device)
    if truncated:
        meta.truncated_rows = torch.tensor(truncated, dtype=torch.long, device=device)
    meta.generators = {
        i: gen for i, (p, gen) in enumerate(zip(rand, generators, strict=True))
        if p is not None and p.seed is not None and gen is not None
    }


def _build_bias(meta: SamplingMetadata, params: list[SamplingParams],
                device: torch.device | str) -> None:
    rows: list[int] = []
    toks: list[int] = []
    vals: list[float] = []
    for i, p in enumerate(params):
        if p.logit_bias:
            rows.extend([i] * len(p.logit_bias))
            toks.extend(p.logit_bias.keys())
            vals.extend(p.logit_bias.values())
    if rows:
        meta.bias_rows = torch.tensor(rows, dtype=torch.long, device=device)
        meta.bias_tokens = torch.tensor(toks, dtype=torch.long, device=device)
        meta.bias_values = torch.tensor(vals, dtype=torch.float32, device=device)


def _build_min_tokens(meta: SamplingMetadata, params: list[SamplingParams],
                      output_token_ids: list[list[int]], eos_token_ids: list[frozenset[int]],
                      device: torch.device | str) -> None:
    rows: list[int] = []
    toks: list[int] = []
    for i, p in enumerate(params):
        if len(output_token_ids[i]) >= p.min_tokens:
            continue
        banned = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            banned |= eos_token_ids[i]
        rows.extend([i] * len(banned))
        toks.extend(banned)
    if rows:
        meta.min_tokens_rows = torch.tensor(rows, dtype=torch.long, device=device)
        meta.min_tokens_tokens = torch.tensor(toks, dtype=torch.long, device=device)


def _flat_pairs(lists: list[list[int]], device: torch.device | str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists -> (row index, token id) tensors, built without padding."""
    lengths = torch.tensor([len(x) for x in lists], dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(lists), device=device), lengths)
    toks = torch.tensor(list(chain.from_iterable(lists)), dtype=torch.long, device=device)
    return rows, toks


def _build_penalties(params: list[SamplingParams], prompt_token_ids: list[list[int]],
                     output_token_ids: list[list[int]], device: torch.device | str
                     ) -> PenaltyData:
    idx = [i for i, p in enumerate(params) if p.needs_penalties]
    sub = [params[i] for i in idx]
    data = PenaltyData(rows=torch.tensor(idx, dtype=torch.long, device=device),
                       repetition=None, seen_rows=None, seen_tokens=None, frequency=None,
                       presence=None, output_rows=None, output_tokens=None)
    if any(p.repetition_penalty != 1.0 for p in sub):
        data.repetition = _column([p.repetition_penalty for p in sub], device)
        data.seen_rows, data.seen_tokens = _flat_pairs(
            [prompt_token_ids[i] + output_token_ids[i] for i in idx], device)
    if any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in sub):
        data.frequency = _column([p.frequency_penalty for p in sub], device)
        data.presence = _column([p.presence_penalty for p in sub], device)
        data.output_rows, data.output_tokens = _flat_pairs(
            [output_token_ids[i] for i in idx], device)
    return data
