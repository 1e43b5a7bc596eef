"""Turns one step's logits into next tokens: logit processors, then greedy or random sampling.

Order: logprobs from the raw logits; logit_bias; min_tokens; penalties; greedy rows take
the argmax; random rows apply temperature, top-k, top-p, min-p and draw by inverting the
CDF of the kept tokens at one float64 uniform per row. Seeded rows draw their uniform from
their own generator, and every step of a row's draw depends only on that row, so their
tokens do not depend on which other rows share the batch.

Top-k / top-p never sort the whole vocabulary in the common case: the kept set is found
among each row's top-K candidates (K adapts, rows that do not fit retry wider), and only
nuclei too big for that fall back to a histogram of each row's values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.runner.draw import draw_uniforms, put_rows, sample_from_probs, take_rows
from server.runner.logprobs import (
    LogprobsTensors,
    compute_prompt_logprobs,
    gather_logprobs,
    to_logprobs,
    to_prompt_logprobs,
)
from server.runner.sampling_metadata import PenaltyData, SamplingMetadata
from server.runner.truncation import TOP_P_WIDTH, apply_min_p, truncated_stages

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "apply_min_p",
           "compute_prompt_logprobs", "to_logprobs", "to_prompt_logprobs"]


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # LongTensor[R]
    # (token_ids [R, 1 + k], logprobs [R, 1 + k], ranks [R]) when any row asked for logprobs.
    logprobs: LogprobsTensors | None = None


class Sampler:
    """Stateless in its results; it only remembers how many top-p candidates to gather first.

    The candidate width never changes which token a row gets (see truncated_stages), so
    tuning it from the previous step keeps seeded requests reproducible.
    """

    def __init__(self) -> None:
        self.top_p_width = TOP_P_WIDTH

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if meta.needs_logit_processing:
            # The processors work in place; the caller's tensor stays untouched.
            logits = logits.clone()
            apply_logit_bias(logits, meta)
            apply_min_tokens(logits, meta)
            if meta.penalties is not None:
                apply_penalties(logits, meta.penalties)
        sampled = logits.argmax(dim=-1) if meta.all_greedy else self._sample(logits, meta)
        lp = None
        if raw_logprobs is not None:
            lp = gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs or 0)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=lp)

    def _sample(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        num_rows = logits.shape[0]
        if meta.all_random:
            sampled = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        else:
            sampled = logits.argmax(dim=-1)
        if meta.temperature is not None:
            logits = logits / meta.temperature
        # One fused pass; every random path reads its probabilities from here.
        probs = torch.softmax(logits, dim=-1)
        u = draw_uniforms(num_rows, meta.generators, logits.device)
        if meta.plain_rows is not None:
            rows = meta.plain_rows
            p = take_rows(probs, rows)
            if meta.min_p is not None:
                p = apply_min_p(p, take_rows(meta.min_p, rows))
            put_rows(sampled, rows, sample_from_probs(p, take_rows(u, rows)))
        if meta.truncated_rows is not None:
            rows = meta.truncated_rows
            stages = truncated_stages(
                take_rows(logits, rows), take_rows(probs, rows),
                None if meta.top_k is None else take_rows(meta.top_k, rows), meta.max_top_k,
                None if meta.top_p is None else take_rows(meta.top_p, rows),
                None if meta.min_p is None else take_rows(meta.min_p, rows),
                self.top_p_width)
            for stage in stages:
                sub = rows if stage.rows is None else rows[stage.rows]
                put_rows(sampled, sub, stage.sample(take_rows(u, sub)))
            if meta.top_p is not None:
                self.top_p_width = stages.next_width
        return sampled


def apply_logit_bias(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    if meta.bias_rows is not None:
        logits.index_put_((meta.bias_rows, meta.bias_tokens), meta.bias_values, accumulate=True)


def apply_min_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    if meta.min_tokens_rows is not None:
        logits[meta.min_tokens_rows, meta.min_tokens_tokens] = float("-inf")


def apply_penalties(logits: torch.Tensor, pen: PenaltyData) -> None:
    """Repetition over prompt + output tokens, then frequency and presence over output."""
    sub = logits[pen.rows]
    num_rows, width = sub.shape
    if pen.repetition is not None:
        seen = torch.zeros(num_rows, width, dtype=torch.bool, device=logits.device)
        seen[pen.seen_rows, pen.seen_tokens] = True
        scaled = torch.where(sub > 0, sub / pen.repetition, sub * pen.repetition)
        sub = torch.where(seen, scaled, sub)
    if pen.frequency is not None:
        counts = torch.zeros(num_rows, width, dtype=torch.float32, device=logits.device)
        counts.index_put_((pen.output_rows, pen.output_tokens),
                          torch.ones_like(pen.output_tokens, dtype=torch.float32),
                          accumulate=True)
        sub = sub - pen.frequency * counts - pen.presence * (counts > 0).float()
    logits[pen.rows] = sub


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, max_top_k: int,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask tokens outside each row's top-k / nucleus to -inf. Ties with the cutoff are kept.

    top_k holds vocab_size for rows without top-k, top_p holds 1.0 for rows without top-p.
    The nucleus is taken within the top-k set, renormalised: the fewest most likely tokens
    whose mass reaches top_p, plus any token tied with the last of them.
    """
    out = torch.full_like(logits, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    for stage in truncated_stages(logits, probs, top_k, max_top_k, top_p, None,
                                   TOP_P_WIDTH):
        rows = slice(None) if stage.rows is None else stage.rows
        x = logits[rows]
        out[rows] = x.masked_fill(x < stage.threshold.unsqueeze(-1), float("-inf"))
    return out


