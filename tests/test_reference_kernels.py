"""kernels.reference against independent float64 oracles and transformers' rope."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import reference as R


def _naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     window: int | None) -> torch.Tensor:
    """float64 causal attention of one sequence's last q.shape[0] positions over k/v [L]."""
    n, hq, _ = q.shape
    length, hkv, _ = k.shape
    k = k.double().repeat_interleave(hq // hkv, dim=1)
    v = v.double().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    qpos = torch.arange(length - n, length)[:, None]
    kpos = torch.arange(length)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= kpos > qpos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _paged_case(query_lens: list[int], seq_lens: list[int], hq: int, hkv: int, block_size: int,
                num_blocks: int = 4096, d: int = 32, seed: int = 0, consecutive: bool = False):
    """Random per-request K/V stored at shuffled blocks (some near the pool's top), or at
    consecutive ids (read as a view, without a gather)."""
    g = torch.Generator().manual_seed(seed)
    cache = torch.zeros(2, num_blocks, block_size, hkv, d)
    # Top-of-pool ids first, then a shuffle of the rest: exercises large block ids.
    pool = list(range(num_blocks - 1, num_blocks - 6, -1))
    pool += torch.randperm(num_blocks - 5, generator=g).tolist()
    if consecutive:
        pool = list(range(7, num_blocks))
    nblk = [math.ceil(s / block_size) for s in seq_lens]
    tables = torch.zeros(len(seq_lens), max(nblk) + 2, dtype=torch.int32)  # extra padding cols
    ks, vs, it = [], [], 0
    for r, length in enumerate(seq_lens):
        blocks = pool[it:it + nblk[r]]
        it += nblk[r]
        tables[r, :nblk[r]] = torch.tensor(blocks, dtype=torch.int32)
        k, v = torch.randn(length, hkv, d, generator=g), torch.randn(length, hkv, d, generator=g)
        for p in range(length):  # plain indexing: independent of write_kv
            cache[0, blocks[p // block_size], p % block_size] = k[p]
            cache[1, blocks[p // block_size], p % block_size] = v[p]
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(query_lens), hq, d, generator=g)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    return q, cache, qsl, tables, ks, vs


CASES = [
    # (query_lens, seq_lens, num_decodes): decodes first, then prefill / chunked prefill.
    ([1, 1, 1, 1], [1, 16, 17, 70], 4),
    ([1, 1, 5, 16, 3], [32, 33, 5, 48, 64], 2),
    ([7, 32, 1], [7, 40, 1], 0),
    ([1, 1, 40], [90, 31, 100], 2),
]


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("window", [None, 8])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_paged_attention_matches_naive(case: int, window: int | None, hq: int, hkv: int,
                                       block_size: int) -> None:
    query_lens, seq_lens, num_decodes = CASES[case]
    q, cache, qsl, tables, ks, vs = _paged_case(query_lens, seq_lens, hq, hkv, block_size)
    scale = 32 ** -0.5
    ws = R.Workspace()
    # Both the batched decode path and the per-request path must agree with the oracle.
    for nd in {num_decodes, 0}:
        out = R.paged_attention(q, cache, qsl, seq_lens, tables, scale, sliding_window=window,
                                num_decodes=nd, workspace=ws)
        for r in range(len(seq_lens)):
            want = _naive_attention(q[qsl[r]:qsl[r + 1]], ks[r], vs[r], scale, window)
            torch.testing.assert_close(out[qsl[r]:qsl[r + 1]].double(), want,
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 8])
def test_prefill_on_consecutive_blocks_matches_naive(window: int | None) -> None:
    # Consecutive block ids are read as a view of the cache; the last request's partial
    # block and the window's first block must still be cut exactly.
    query_lens, seq_lens = [5, 16, 3, 40], [5, 48, 64, 100]
    q, cache, qsl, tables, ks, vs = _paged_case(query_lens, seq_lens, 8, 2, 16,
                                                consecutive=True)
    assert (tables[1, 1:3] - tables[1, 0:2] == 1).all()
    out = R.paged_attention(q, cache, qsl, seq_lens, tables, 0.2, sliding_window=window,
                            workspace=R.Workspace())
    for r in range(len(seq_lens)):
        want = _naive_attention(q[qsl[r]:qsl[r + 1]], ks[r], vs[r], 0.2, window)
        torch.testing.assert_close(out[qsl[r]:qsl[r + 1]].double(), want, atol=1e-5, rtol=1e-5)


def test_paged_attention_accepts_tensors_and_reuses_workspace() -> None:
    ws = R.Workspace()
    for seq_lens in ([200, 3, 64], [5, 9, 2]):  # shrink after growing: stale data masked
        q, cache, qsl, tables, ks, vs = _paged_case([1, 1, 1], seq_lens, 4, 2, 16, seed=3)
        out = R.paged_attention(q, cache, torch.tensor(qsl, dtype=torch.int32),
                                torch.tensor(seq_lens, dtype=torch.int32), tables, 0.2,
                                num_decodes=3, workspace=ws)
        for r in range(3):
            want = _naive_attention(q[r:r + 1], ks[r], vs[r], 0.2, None)
            torch.testing.assert_close(out[r:r + 1].double(), want, atol=1e-5, rtol=1e-5)


def test_paged_attention_bf16_close_to_fp32() -> None:
    q, cache, qsl, tables, _, _ = _paged_case([1, 1, 9], [50, 17, 40], 8, 2, 16)
    ref = R.paged_attention(q, cache, qsl, [50, 17, 40], tables, 0.25, num_decodes=2)
    out = R.paged_attention(q.bfloat16(), cache.bfloat16(), qsl, [50, 17, 40], tables, 0.25,
                            num_decodes=2)
    assert out.dtype == torch.bfloat16
    # bf16 inputs carry ~3 significant digits; outputs are averages of O(1) values.
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=0)


def test_paged_attention_rejects_bad_shapes() -> None:
    q, cache, qsl, tables, _, _ = _paged_case([2, 1], [2, 5], 4, 4, 16)
    with pytest.raises(ValueError, match="one query row"):
        R.paged_attention(q, cache, qsl, [2, 5], tables, 1.0, num_decodes=1)
    with pytest.raises(ValueError, match="multiple"):
        R.paged_attention(q[:, :3], cache, qsl, [2, 5], tables, 1.0)


def test_write_kv_exact_slots() -> None:
    cache = torch.zeros(2, 8, 4, 2, 3)
    key = torch.arange(5 * 6, dtype=torch.float32).view(5, 2, 3) + 1
    value = -key
    slots = torch.tensor([31, 0, 5, 17, 4])
    R.write_kv(key, value, cache, slots)
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(cache[0, s // 4, s % 4], key[i])
        assert torch.equal(cache[1, s // 4, s % 4], value[i])
    assert int((cache != 0).sum()) == 2 * key.numel()  # nothing else touched


def test_rms_norm_with_and_without_residual() -> None:
    g = torch.Generator().manual_seed(1)
    x, res = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    w = torch.randn(16, generator=g)
    eps = 1e-6

    def oracle(t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        return w.double() * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + eps)

    torch.testing.assert_close(R.rms_norm(x, w, eps).double(), oracle(x), atol=1e-5, rtol=1e-5)
    normed, new_res = R.rms_norm(x, w, eps, residual=res)
    assert torch.equal(new_res, x + res)
    torch.testing.assert_close(normed.double(), oracle(x + res), atol=1e-5, rtol=1e-5)
    assert R.rms_norm(x.bfloat16(), w.bfloat16(), eps).dtype == torch.bfloat16


def test_silu_and_mul() -> None:
    x = torch.linspace(-4, 4, 2 * 3 * 10).view(3, 20)
    gate, up = x[:, :10].double(), x[:, 10:].double()
    want = gate / (1 + torch.exp(-gate)) * up
    torch.testing.assert_close(R.silu_and_mul(x).double(), want, atol=1e-6, rtol=1e-6)


def _hf_rope(rope_parameters: dict, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
             max_pos: int = 4096):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                      max_position_embeddings=max_pos, rope_parameters=rope_parameters)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, positions[None])
    # HF layout: [batch, heads, seq, dim]
    qh, kh = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    return qh[0].transpose(0, 1), kh[0].transpose(0, 1)


ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 512},
    "yarn": {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
             "original_max_position_embeddings": 1024},
}


@pytest.mark.parametrize("name", list(ROPES))
def test_rotary_matches_transformers(name: str) -> None:
    params = ROPES[name]
    scaling = None if name == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    g = torch.Generator().manual_seed(2)
    positions = torch.tensor([0, 1, 5, 511, 512, 700, 2047, 4000])
    q, k = torch.randn(8, 4, 64, generator=g), torch.randn(8, 2, 64, generator=g)
    cache = R.build_cos_sin_cache(64, 4096, params["rope_theta"], scaling)
    q_out, k_out = R.rotary_embedding(positions, q.view(8, -1), k, cache, head_dim=64)
    q_ref, k_ref = _hf_rope(params, positions, q, k)
    torch.testing.assert_close(q_out.view(8, 4, 64), q_ref, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(k_out, k_ref, atol=2e-4, rtol=1e-4)


def test_rotary_gptj_style_and_partial() -> None:
    """Interleaved pairs rotate like complex numbers; dims past rot_dim pass through."""
    g = torch.Generator().manual_seed(3)
    positions = torch.tensor([3, 10])
    q, k = torch.randn(2, 2, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    cache = R.build_cos_sin_cache(4, 16, 100.0)
    q_out, k_out = R.rotary_embedding(positions, q, k, cache, head_dim=8, is_neox=False)
    freqs = 1.0 / 100.0 ** (torch.arange(0, 4, 2).double() / 4)
    for x, out in ((q, q_out), (k, k_out)):
        z = torch.view_as_complex(x[..., :4].double().reshape(2, -1, 2, 2).contiguous())
        rot = torch.polar(torch.ones(2, 2, dtype=torch.float64),
                          positions[:, None].double() * freqs)
        want = torch.view_as_real(z * rot[:, None]).reshape(2, -1, 4)
        torch.testing.assert_close(out[..., :4].double(), want, atol=1e-5, rtol=1e-5)
        assert torch.equal(out[..., 4:], x[..., 4:])


def test_unknown_rope_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        R.build_cos_sin_cache(64, 128, 10000.0, {"rope_type": "dynamic", "factor": 2.0})
