"""Top-k / top-p truncation and the CDF draw against float64 oracles and frequencies."""

from __future__ import annotations

import math

import pytest
import torch

from server.runner.sampler import (
    Sampler,
    apply_top_k_top_p,
)
from server.sampling_params import SamplingParams
from tests.test_sampler import meta_for


def _ref_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    """Oracle: the top-k (ties kept), then the fewest most likely tokens reaching top_p of
    that set's mass, plus ties with the last of them."""
    x = logits.double()
    if top_k < x.numel():
        kth = x.sort(descending=True).values[top_k - 1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    desc = probs.sort(descending=True).values
    n = int((desc.cumsum(0) < top_p).sum()) + 1 if top_p < 1.0 else int((probs > 0).sum())
    cutoff = x.sort(descending=True).values[min(n, x.numel()) - 1]
    return set((x >= cutoff).nonzero().flatten().tolist())


@pytest.mark.parametrize("vocab", [1000, 5000])
def test_top_k_top_p_sets_match_oracle_on_every_path(vocab):
    # Sharp rows settle in the first topk, flat ones need a wider topk or the histogram.
    g = torch.Generator().manual_seed(6)
    scales = torch.tensor([0.3, 1.0, 3.0, 8.0]).repeat_interleave(4)
    logits = torch.randn(16, vocab, generator=g) * scales[:, None]
    cases = [(vocab, 0.9), (vocab, 0.5), (vocab, 0.99), (20, 0.8), (700, 0.95), (3, 1.0)]
    for k, p in cases:
        top_k = torch.full((16,), k)
        top_p = None if p == 1.0 else torch.full((16,), p)
        out = apply_top_k_top_p(logits, top_k if k < vocab else None, k, top_p)
        for r in range(16):
            kept = set(torch.isfinite(out[r]).nonzero().flatten().tolist())
            assert kept == _ref_top_k_top_p(logits[r], k, p), (k, p, r)
            assert torch.equal(out[r][list(kept)], logits[r][list(kept)])


def test_top_p_keeps_ties_with_the_cutoff():
    # Two tokens tie at 0.3: a nucleus of 0.5 needs the first, and keeps its twin too.
    probs = torch.tensor([[0.4, 0.3, 0.3]])
    out = apply_top_k_top_p(probs.log(), None, 0, torch.tensor([0.5]))
    assert torch.isfinite(out).all()
    out = apply_top_k_top_p(probs.log(), None, 0, torch.tensor([0.4]))
    assert torch.isfinite(out).tolist() == [[True, False, False]]


def _freq(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),  # whole-vocabulary draw
    SamplingParams(temperature=0.7, top_p=0.999),  # candidates, then the histogram
    SamplingParams(top_k=40),  # candidates
])
def test_sampled_frequencies_match_the_distribution(params):
    vocab, n = 1000, 20000
    g = torch.Generator().manual_seed(7)
    row = torch.randn(vocab, generator=g) * 2
    row[:300:7] = float("-inf")  # banned tokens, spread over several blocks
    logits = row.repeat(n, 1)
    torch.manual_seed(8)
    out = Sampler()(logits, meta_for([params] * n, vocab=vocab)).sampled_token_ids
    x = row / params.temperature
    keep = _ref_top_k_top_p(x, params.top_k or vocab, params.top_p)
    target = torch.zeros(vocab, dtype=torch.float64)
    idx = torch.tensor(sorted(keep))
    target[idx] = x.double()[idx].softmax(-1)
    freq = _freq(out, vocab)
    assert set(out.unique().tolist()) <= keep
    assert not torch.isinf(row[out]).any()
    # Total variation within sampling noise for 20000 draws.
    assert 0.5 * (freq - target).abs().sum().item() < 0.05
    assert (freq - target).abs().max().item() < 0.01


def test_masked_tokens_are_never_sampled():
    vocab, n = 600, 4000
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(n, vocab, generator=g)
    # top_k=2: only each row's two best tokens, in proportion to their probabilities.
    torch.manual_seed(10)
    out = Sampler()(logits, meta_for([SamplingParams(top_k=2)] * n, vocab=vocab))
    top2 = logits.topk(2, dim=-1).indices
    assert (top2 == out.sampled_token_ids[:, None]).any(-1).all()
    same = torch.full((n, vocab), -5.0)
    same[:, [5, 300]] = torch.tensor([0.0, 1.0])
    same[:, 511] = float("-inf")
    torch.manual_seed(11)
    toks = Sampler()(same, meta_for([SamplingParams(top_k=2)] * n, vocab=vocab))
    freq = _freq(toks.sampled_token_ids, vocab)
    assert set(toks.sampled_token_ids.unique().tolist()) == {5, 300}
    assert abs(freq[300].item() - 1 / (1 + math.exp(-1))) < 0.03
    # -inf logits, including a whole block and the last tokens of the vocabulary, with the
    # rest of the mass on a token far away: never drawn on any path.
    spiky = torch.full((n, vocab), float("-inf"))
    spiky[:, 3] = 0.0
    spiky[:, 590] = -30.0  # probability ~1e-13: allowed, but not expected
    for params in (SamplingParams(), SamplingParams(top_p=0.9), SamplingParams(min_p=0.1),
                   SamplingParams(seed=1), SamplingParams(top_k=5, seed=2)):
        gens = [torch.Generator().manual_seed(i) for i in range(n)] if params.seed else None
        toks = Sampler()(spiky, meta_for([params] * n, vocab=vocab, generators=gens))
        assert set(toks.sampled_token_ids.unique().tolist()) <= {3, 590}, params


def test_sample_does_not_depend_on_candidate_width():
    """The first topk width adapts across steps; a seeded row's token must not care."""
    vocab, n = 3000, 48
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(n, vocab, generator=g) * torch.linspace(0.2, 6, n)[:, None]
    params = [SamplingParams(seed=i, temperature=0.9, top_p=0.95, min_p=0.01 * (i % 3))
              for i in range(n)]
    results = []
    for width in (1, 32, 128, 2048):
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        sampler = Sampler()
        sampler.top_p_width = width
        results.append(sampler(logits, meta_for(params, vocab=vocab, generators=gens))
                       .sampled_token_ids)
    for r in results[1:]:
        assert torch.equal(r, results[0])
    # Each row alone, with its own fresh generator, draws the same token as in the batch.
    for i in range(0, n, 5):
        gen = [torch.Generator().manual_seed(i)]
        alone = Sampler()(logits[i:i + 1], meta_for([params[i]], vocab=vocab, generators=gen))
        assert alone.sampled_token_ids.item() == results[0][i].item()
