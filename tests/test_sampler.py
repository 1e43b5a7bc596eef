"""Sampler against exact oracles: argmax, log_softmax, hand-computed penalties, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from server.runner.logprobs import to_prompt_logprobs
from server.runner.sampler import (
    Sampler,
    SamplingMetadata,
    apply_logit_bias,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
    compute_prompt_logprobs,
    to_logprobs,
)
from server.sampling_params import SamplingParams

V = 64
EOS = frozenset({1})


def meta_for(params, outputs=None, prompts=None, generators=None, vocab=V, eos=EOS):
    n = len(params)
    return SamplingMetadata.build(
        params=params,
        prompt_token_ids=prompts or [[] for _ in range(n)],
        output_token_ids=outputs or [[] for _ in range(n)],
        generators=generators or [None] * n,
        eos_token_ids=[eos] * n,
        vocab_size=vocab,
        device="cpu",
    )


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def test_greedy_is_argmax_with_lowest_index_on_ties():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(0))
    logits[3, 10] = logits[3, 20] = logits[3].max() + 1.0
    meta = meta_for([greedy() for _ in range(8)])
    assert meta.all_greedy and meta.temperature is None and meta.top_k is None
    assert not meta.needs_logit_processing and meta.max_num_logprobs is None
    out = Sampler()(logits, meta)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids[3].item() == 10
    assert out.logprobs is None


def test_logprobs_are_raw_log_softmax_with_ranks_and_top_k():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, V, generator=g) * 3
    # Bias and temperature must not leak into the reported logprobs.
    params = [greedy(logprobs=2), SamplingParams(temperature=0.8, seed=3, logprobs=5),
              greedy(logit_bias={7: 100.0}, logprobs=0), greedy()]
    gens = [None, torch.Generator().manual_seed(3), None, None]
    meta = meta_for(params, generators=gens)
    assert meta.max_num_logprobs == 5
    original = logits.clone()
    out = Sampler()(logits, meta)
    assert torch.equal(logits, original)
    ids, lps, ranks = out.logprobs
    assert ids.shape == lps.shape == (4, 6) and ranks.shape == (4,)
    ref = torch.log_softmax(logits, dim=-1)
    sampled = out.sampled_token_ids
    assert sampled[2].item() == 7
    assert torch.equal(ids[:, 0], sampled)
    torch.testing.assert_close(lps[:, 0], ref.gather(1, sampled[:, None])[:, 0], rtol=0, atol=1e-6)
    for r in range(4):
        exp_rank = int((ref[r] > ref[r, sampled[r]]).sum()) + 1
        assert ranks[r].item() == exp_rank
        top = torch.topk(ref[r], 5)
        assert ids[r, 1:].tolist() == top.indices.tolist()
        torch.testing.assert_close(lps[r, 1:], top.values, rtol=0, atol=1e-6)
    assert ranks[0].item() == 1  # greedy picks the most likely token
    assert ranks[2].item() > 1 or ref[2].argmax().item() == 7

    per_row = to_logprobs(ids, lps, ranks, num_per_row=[2, 5, 0, 0])
    assert [len(p.token_ids[0]) for p in per_row] == [3, 6, 1, 1]
    assert per_row[1].token_ids[0] == ids[1].tolist()
    assert per_row[2].ranks == [ranks[2].item()]
    assert per_row[0].logprobs[0] == lps[0, :3].tolist()


def test_prompt_logprobs_match_log_softmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, V, generator=g)
    targets = torch.tensor([3, 9, 0, 63, 17])
    ids, lps, ranks = compute_prompt_logprobs(logits.to(torch.bfloat16).float(), targets, 3)
    ref = torch.log_softmax(logits.to(torch.bfloat16).float(), dim=-1)
    assert ids[:, 0].tolist() == targets.tolist()
    for i, t in enumerate(targets.tolist()):
        assert math.isclose(lps[i, 0].item(), ref[i, t].item(), abs_tol=1e-6)
        assert ranks[i].item() == int((ref[i] > ref[i, t]).sum()) + 1
        assert ids[i, 1:].tolist() == torch.topk(ref[i], 3).indices.tolist()
    lp = to_prompt_logprobs(ids, lps, ranks, num_logprobs=1)
    assert len(lp.token_ids) == 5 and all(len(row) == 2 for row in lp.token_ids)
    assert lp.ranks == ranks.tolist()
    # k = 0 gives only the chosen token.
    ids0, lps0, _ = compute_prompt_logprobs(logits, targets, 0)
    assert ids0.shape == (5, 1) and ids0[:, 0].tolist() == targets.tolist()


def _processed(logits, params, outputs=None, prompts=None):
    """Logits after the processors that run before sampling: bias, min_tokens, penalties."""
    meta = meta_for(params, outputs=outputs, prompts=prompts)
    x = logits.clone()
    apply_logit_bias(x, meta)
    apply_min_tokens(x, meta)
    if meta.penalties is not None:
        apply_penalties(x, meta.penalties)
    return x, meta


def test_logit_bias_shifts_and_flips_argmax():
    logits = torch.zeros(2, V)
    logits[:, 5] = 2.0
    params = [greedy(logit_bias={9: 3.0, 5: -1.5}), greedy()]
    x, meta = _processed(logits, params)
    expected = logits.clone()
    expected[0, 9] += 3.0
    expected[0, 5] -= 1.5
    assert torch.equal(x, expected)
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [9, 5]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(4, V)
    params = [
        greedy(min_tokens=3, stop_token_ids=[4]),
        greedy(min_tokens=3, stop_token_ids=[4], ignore_eos=True),
        greedy(min_tokens=2, stop_token_ids=[4]),  # already has 2 outputs: no mask
        greedy(stop_token_ids=[4]),
    ]
    outputs = [[10, 11], [10], [10, 11], []]
    x, _ = _processed(logits, params, outputs=outputs)
    inf = float("-inf")
    assert x[0, 1] == inf and x[0, 4] == inf
    assert x[1, 1] == 0.0 and x[1, 4] == inf
    assert torch.equal(x[2:], torch.zeros(2, V))
    assert int(torch.isinf(x).sum()) == 3
    # EOS is the argmax but masked: the sampler moves on to the next best.
    logits[:, 1] = 5.0
    logits[:, 2] = 4.0
    meta = meta_for(params, outputs=outputs)
    assert Sampler()(logits, meta).sampled_token_ids.tolist() == [2, 1, 1, 1]


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = [
        greedy(repetition_penalty=2.0),
        greedy(frequency_penalty=0.5, presence_penalty=0.25),
        greedy(repetition_penalty=1.5, frequency_penalty=-0.5, presence_penalty=1.0),
    ]
    prompts = [[0, 1], [0, 1], [4]]
    outputs = [[3, 3], [3, 3, 2], [1, 1, 5]]
    meta = meta_for(params, outputs=outputs, prompts=prompts, vocab=6)
    x = logits.clone()
    apply_penalties(x, meta.penalties)
    expected = torch.tensor([
        # rep 2 over {0, 1, 3}: positive / 2, negative * 2
        [1.0, -2.0, 0.5, 1.5, -2.0, 1.0],
        # freq 0.5 * count + presence 0.25 on output {3: 2, 2: 1}
        [2.0, -1.0, 0.5 - 0.5 - 0.25, 3.0 - 1.0 - 0.25, -2.0, 1.0],
        # rep 1.5 over {4, 1, 5}, then freq -0.5 * count + presence 1 on {1: 2, 5: 1}
        [2.0, -1.5 + 1.0 - 1.0, 0.5, 3.0, -3.0, 1.0 / 1.5 + 0.5 - 1.0],
    ])
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)


def test_top_k_one_and_tiny_top_p_equal_greedy():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(32, V, generator=g) * 2
    params = ([SamplingParams(temperature=0.7, top_k=1) for _ in range(16)]
              + [SamplingParams(temperature=1.3, top_p=1e-6) for _ in range(16)])
    for _ in range(5):
        out = Sampler()(logits, meta_for(params))
        assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_top_k_and_top_p_keep_exactly_the_expected_sets():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, V, generator=g)
    top_k = torch.tensor([5, V, 3])
    top_p = torch.tensor([1.0, 0.5, 0.5])
    only_k = apply_top_k_top_p(logits, top_k, 5, None)
    both = apply_top_k_top_p(logits, top_k, 5, top_p)
    probs = logits.softmax(-1)
    for r in range(3):
        desc = probs[r].argsort(descending=True).tolist()
        k = int(top_k[r])
        keep_k = set(desc[:k])
        assert set(torch.isfinite(only_k[r]).nonzero().flatten().tolist()) == keep_k
        # Nucleus of the top-k renormalised distribution: the fewest tokens reaching p.
        sub = probs[r, desc[:k]] / probs[r, desc[:k]].sum()
        n = int((sub.cumsum(0) < float(top_p[r])).sum()) + 1
        kept = set(torch.isfinite(both[r]).nonzero().flatten().tolist())
        assert kept == set(desc[:min(n, k)])
        assert torch.equal(both[r][list(kept)], logits[r][list(kept)])


def test_min_p_masks_and_is_never_sampled():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.4, 0.3, 0.2, 0.1]])
    masked = apply_min_p(probs, torch.tensor([[0.35], [0.0]]))
    expected = probs.clone()
    expected[0, 2:] = 0.0
    assert torch.equal(masked, expected)
    logits = torch.log(probs[:1]).repeat(2000, 1)
    torch.manual_seed(0)
    out = Sampler()(logits, meta_for([SamplingParams(min_p=0.35)] * 2000, vocab=4))
    counts = torch.bincount(out.sampled_token_ids, minlength=4).tolist()
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] / 2000 - 0.625) < 0.04


def test_temperature_sampling_distribution():
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 5000
    logits = torch.log(p).repeat(n, 1)
    torch.manual_seed(1234)
    for temp in (1.0, 2.0):
        out = Sampler()(logits, meta_for([SamplingParams(temperature=temp)] * n, vocab=4))
        freq = torch.bincount(out.sampled_token_ids, minlength=4).float() / n
        target = p ** (1 / temp) / (p ** (1 / temp)).sum()
        assert (freq - target).abs().max().item() < 0.02, (temp, freq, target)
    # Seeded rows draw from their own generators: same distribution.
    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    out = Sampler()(logits[:2000],
                    meta_for([SamplingParams(seed=i) for i in range(2000)], vocab=4,
                             generators=gens))
    freq = torch.bincount(out.sampled_token_ids, minlength=4).float() / 2000
    assert (freq - p).abs().max().item() < 0.03


def _step_logits(req: int, step: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(1000 * req + step)) * 2


def _run(params: list[SamplingParams], req_ids: list[int], steps: int) -> list[list[int]]:
    """Decode `steps` tokens for a batch whose per-request logits depend only on the request."""
    gens = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None
            for p in params]
    outputs: list[list[int]] = [[] for _ in params]
    for step in range(steps):
        logits = torch.stack([_step_logits(r, step) for r in req_ids])
        meta = SamplingMetadata.build(params, [[2, 3, 4]] * len(params), outputs, gens,
                                      [EOS] * len(params), V, "cpu")
        toks = Sampler()(logits, meta).sampled_token_ids.tolist()
        for out, t in zip(outputs, toks, strict=True):
            out.append(t)
    return outputs


@pytest.mark.parametrize("target", [
    SamplingParams(seed=7),
    SamplingParams(seed=11, temperature=0.9, top_k=8, top_p=0.9, min_p=0.05,
                   repetition_penalty=1.3, logprobs=2),
])
def test_seeded_request_same_alone_and_in_mixed_batch(target):
    steps = 10
    alone = _run([target], [0], steps)[0]
    others = [
        SamplingParams(), greedy(), SamplingParams(seed=3, top_k=5),
        SamplingParams(temperature=0.5, top_p=0.8), greedy(frequency_penalty=1.0),
        SamplingParams(seed=99, min_p=0.2, logit_bias={3: 5.0}), SamplingParams(top_k=2),
        SamplingParams(seed=1, temperature=1.5, presence_penalty=0.5, logprobs=4),
    ]
    batch = ([others[i % len(others)] for i in range(7)] + [target]
             + [others[i % len(others)] for i in range(7, 15)])
    outs = _run(batch, list(range(1, 8)) + [0] + list(range(8, 16)), steps)
    assert outs[7] == alone
    # A different seed gives a different sequence: the check above is not vacuous.
    other_seed = SamplingParams(**{**_fields(target), "seed": target.seed + 1})
    assert _run([other_seed], [0], steps)[0] != alone


def _fields(p: SamplingParams) -> dict:
    return {k: v for k, v in vars(p).items() if not k.startswith("_")}
