"""Drawing tokens: one float64 uniform per row, then inversion of the row's CDF.

A seeded row draws its uniform from its own generator, so its tokens do not depend on
which other rows share the batch.
"""

from __future__ import annotations

import torch


def draw_uniforms(num_rows: int, generators: dict[int, torch.Generator],
                  device: torch.device) -> torch.Tensor:
    """One float64 uniform in [0, 1) per row.

    Unseeded rows share one batched draw; a seeded row draws exactly one number from its
    own generator per step, so its stream is the same alone or in any batch.
    """
    if len(generators) < num_rows:
        u = torch.rand(num_rows, dtype=torch.float64, device=device)
    else:
        u = torch.empty(num_rows, dtype=torch.float64, device=device)
    if generators:
        rows = torch.tensor(list(generators), dtype=torch.long, device=device)
        u[rows] = torch.cat([torch.rand(1, dtype=torch.float64, device=device, generator=g)
                             for g in generators.values()])
    return u


def invert_cdf(cum: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index i of each row with cum[i - 1] <= u * cum[-1] < cum[i], for cum [N, K] float64."""
    return search_cdf(cum, u * cum[:, -1])


def search_cdf(cum: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First index of each row of cum [N, K] strictly above target [N] (clamped below cum[-1]).

    Only a token with positive weight can be picked: a zero-weight token repeats its
    predecessor's cum, which is not above the target, and the clamp keeps the target
    below the total, which rounding in u * total could otherwise reach.
    """
    total = cum[:, -1]
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    pos = torch.searchsorted(cum, target.unsqueeze(-1), right=True).squeeze(-1)
    # Out of range only for a row without any positive weight (NaN or all -inf logits).
    return pos.clamp_(max=cum.shape[-1] - 1)


# Tokens per block of the two-level CDF inversion over a whole vocabulary.
_BLOCK = 256


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw from each row of unnormalised probs [N, V] by inverting its CDF at u [N].

    A full float64 cumsum of [N, V] would cost more than the softmax, and a float32 one
    loses tokens less likely than its rounding near 1. So: float32 sums of blocks of
    _BLOCK tokens, a float64 CDF over the blocks to pick one, and a float64 CDF within
    the block. The offset into the block is rescaled from the block's float32 sum to its
    float64 one, so every token keeps its probability up to float32 rounding.
    """
    num_rows, vocab = probs.shape
    num_full = vocab // _BLOCK
    sums = [probs[:, :num_full * _BLOCK].view(num_rows, num_full, _BLOCK).sum(dim=-1)]
    if vocab % _BLOCK:
        sums.append(probs[:, num_full * _BLOCK:].sum(dim=-1, keepdim=True))
    block_sums = torch.cat(sums, dim=-1) if len(sums) > 1 else sums[0]
    block_cum = block_sums.double().cumsum(dim=-1)
    total = block_cum[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    block = search_cdf(block_cum, target)
    before = block_cum.gather(-1, (block - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    before = before.masked_fill(block == 0, 0.0)
    cols = block.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=probs.device)
    inside = cols < vocab
    weights = probs.gather(-1, cols.clamp(max=vocab - 1)).double().masked_fill_(~inside, 0.0)
    cum = weights.cumsum(dim=-1)
    block_sum = block_sums.gather(-1, block.unsqueeze(-1)).squeeze(-1).double()
    # target >= before by the search, so the offset is never negative.
    offset = (target - before) * (cum[:, -1] / block_sum)
    return block * _BLOCK + search_cdf(cum, offset)

def take_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """t[rows], without the copy when rows (ascending, unique) is every row."""
    return t if rows.numel() == t.shape[0] else t[rows]


def put_rows(out: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    if rows.numel() == out.shape[0]:
        out.copy_(values)
    else:
        out[rows] = values
