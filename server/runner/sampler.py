"""Turns one step's logits into next tokens: logit processors, then greedy or random sampling.

Order: logprobs from the raw logits; logit_bias; min_tokens; penalties; greedy rows take
the argmax; random rows apply temperature, top-k, top-p, min-p and draw with the
exponential race argmax(p / q), q ~ Exp(1). Seeded rows draw q from their own generator,
so their tokens do not depend on which other rows share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.runner.logprobs import (
    LogprobsTensors,
    compute_prompt_logprobs,
    gather_logprobs,
    to_logprobs,
    to_prompt_logprobs,
)
from server.runner.sampling_metadata import PenaltyData, SamplingMetadata

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata", "compute_prompt_logprobs",
           "to_logprobs", "to_prompt_logprobs"]


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # LongTensor[R]
    # (token_ids [R, 1 + k], logprobs [R, 1 + k], ranks [R]) when any row asked for logprobs.
    logprobs: LogprobsTensors | None = None


class Sampler:
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

    @staticmethod
    def _sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        greedy = None if meta.all_random else logits.argmax(dim=-1)
        if meta.temperature is not None:
            logits = logits / meta.temperature
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.max_top_k, meta.top_p)
        probs = torch.softmax(logits, dim=-1)
        if meta.min_p is not None:
            probs = apply_min_p(probs, meta.min_p)
        sampled = exponential_race(probs, meta.generators)
        if greedy is not None and meta.greedy_mask is not None:
            sampled = torch.where(meta.greedy_mask, greedy, sampled)
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
    """Mask tokens outside each row's top-k / nucleus to -inf. Ties with the k-th are kept.

    top_k holds vocab_size for rows without top-k, top_p holds 1.0 for rows without top-p.
    """
    neg_inf = float("-inf")
    vocab = logits.shape[-1]
    if top_p is None:
        # Top-k alone: one topk of the largest k instead of a full sort.
        assert top_k is not None
        values = logits.topk(max_top_k, dim=-1).values
        kth = values.gather(-1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(-1))
        kth = kth.masked_fill((top_k >= vocab).unsqueeze(-1), neg_inf)
        return logits.masked_fill(logits < kth, neg_inf)
    ascending, order = logits.sort(dim=-1)
    if top_k is not None:
        kth = ascending.gather(-1, (vocab - top_k.clamp(max=vocab)).unsqueeze(-1))
        ascending = ascending.masked_fill(ascending < kth, neg_inf)
    cum = ascending.softmax(dim=-1).cumsum(dim=-1)
    # A token goes when all tokens at least as likely already reach top_p; the top stays.
    drop = cum <= (1.0 - top_p).unsqueeze(-1)
    drop[:, -1] = False
    ascending = ascending.masked_fill(drop, neg_inf)
    return torch.empty_like(logits).scatter_(-1, order, ascending)


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero tokens less likely than min_p times the row's top probability."""
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]
                     ) -> torch.Tensor:
    """Sample each row of (unnormalised) probs: argmax(p / q) with q ~ Exp(1) per token.

    Unseeded rows share one batched draw; a seeded row draws its whole row from its own
    generator, so its noise is the same alone or in any batch.
    """
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    # q can be exactly 0, and 0 / 0 is NaN, which argmax would pick.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)
