"""kernels.triton_attention.paged_attention against kernels.reference.paged_attention.

Runs natively on a GPU (TRITON_INTERPRET=0) or on CPU under the Triton interpreter. Cache
slots no request may read (block 0, the target of padded block-table entries; unused blocks;
slots past a request's length) hold NaN, so any read outside the visible range poisons the
output. Output rows past the last request hold a sentinel that must survive.

Not covered: block_id * block_stride > 2^31 elements needs a pool of > 4 GiB, too big for a
test; the kernel does that product in int64 and the tests use block ids > 2^16.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import reference as R
from kernels import triton_attention as TA
from kernels import triton_decode as TD

SENTINEL = 123.0
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _case(device: str, query_lens: list[int], seq_lens: list[int], hq: int, hkv: int, d: int,
          block_size: int, dtype: torch.dtype, *, num_blocks: int | None = None,
          top_ids: bool = False, pad_rows: int = 2, seed: int = 0) -> dict:
    """Random K/V for each request at shuffled block ids; everything unreadable is NaN."""
    g = torch.Generator().manual_seed(seed)
    nblk = [math.ceil(s / block_size) for s in seq_lens]
    need = sum(nblk)
    num_blocks = num_blocks or need + 8
    if top_ids:  # the highest ids of the pool, shuffled
        ids = (num_blocks - 1 - torch.randperm(need, generator=g)).tolist()
    else:  # never block 0: padded table entries point there
        ids = (torch.randperm(num_blocks - 1, generator=g)[:need] + 1).tolist()
    cache = torch.full((2, num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    tables = torch.zeros(len(seq_lens), max(nblk, default=0) + 2, dtype=torch.int32)
    it = 0
    for r, length in enumerate(seq_lens):
        blocks = torch.tensor(ids[it:it + nblk[r]], dtype=torch.int64)
        it += nblk[r]
        tables[r, :nblk[r]] = blocks.to(torch.int32)
        pos = torch.arange(length)
        kv = torch.randn(2, length, hkv, d, generator=g).to(dtype)
        cache[:, blocks[pos // block_size], pos % block_size] = kv
    num_tokens = sum(query_lens)
    query = torch.randn(num_tokens + pad_rows, hq, d, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    return {
        "query": query.to(device), "kv_cache": cache.to(device),
        "query_start_loc": qsl.to(device),
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device),
        "block_tables": tables.to(device), "num_tokens": num_tokens,
        "max_query_len": max(query_lens, default=0), "max_seq_len": max(seq_lens, default=0),
    }


def _run_and_check(c: dict, *, window: int | None = None, num_splits: int | None = None,
                   scale: float | None = None, max_query_len: int | None = None) -> None:
    query, n = c["query"], c["num_tokens"]
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out = torch.full_like(query, SENTINEL)
    res = TA.paged_attention(
        query, c["kv_cache"], c["query_start_loc"], c["seq_lens"], c["block_tables"], scale,
        max_query_len=max_query_len or c["max_query_len"], max_seq_len=c["max_seq_len"],
        sliding_window=window, out=out, num_splits=num_splits,
    )
    assert res is out
    # The oracle runs in fp32 on the same (rounded) inputs, with the NaN poison zeroed.
    ref = R.paged_attention(
        query[:n].float(), torch.nan_to_num(c["kv_cache"].float()), c["query_start_loc"],
        c["seq_lens"], c["block_tables"], scale, sliding_window=window,
    )
    tol = TOL[query.dtype]
    torch.testing.assert_close(out[:n].float(), ref, atol=tol, rtol=tol)
    assert (out[n:] == SENTINEL).all(), "padding rows were written"


# (query_lens, seq_lens): mixed batches in any order. Lengths hit 1, block_size (16 / 32)
# and +/- 1, several blocks; prefill without context (seq == query) and chunked with context.
BATCHES = [
    ([1, 1, 6, 1, 17], [1, 16, 6, 33, 50]),       # decodes first, then interleaved
    ([9, 1, 1, 3, 1], [31, 17, 32, 3, 70]),        # prefill first, chunked (ctx 22)
]

# (hq, hkv, head_dim, block_size, dtype): GQA 1 / 4 / 8 and odd 3 / 7.
CONFIGS = [
    (2, 2, 32, 16, torch.float32),
    (8, 2, 32, 32, torch.float32),
    (8, 1, 64, 16, torch.float32),
    (6, 2, 32, 16, torch.float32),
    (7, 1, 32, 32, torch.bfloat16),
    (4, 4, 64, 32, torch.bfloat16),
    (8, 2, 32, 16, torch.bfloat16),
    (8, 1, 32, 32, torch.float16),
]


@pytest.mark.parametrize("batch", range(len(BATCHES)))
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_mixed_batch_matches_reference(kernel_device: str, config: tuple, batch: int) -> None:
    hq, hkv, d, block_size, dtype = config
    query_lens, seq_lens = BATCHES[batch]
    _run_and_check(_case(kernel_device, query_lens, seq_lens, hq, hkv, d, block_size, dtype))


@pytest.mark.parametrize("hq,hkv,d,dtype", [(4, 1, 128, torch.bfloat16),
                                            (2, 2, 128, torch.float32),
                                            (2, 1, 256, torch.bfloat16),
                                            (3, 1, 80, torch.float32)])  # padded head dim
def test_large_and_odd_head_dims(kernel_device: str, hq: int, hkv: int, d: int,
                                 dtype: torch.dtype) -> None:
    c = _case(kernel_device, [1, 5, 1], [20, 37, 33], hq, hkv, d, 16, dtype)
    _run_and_check(c)


def test_block_size_below_tile(kernel_device: str) -> None:
    """block_size 8: one KV tile spans several blocks."""
    _run_and_check(_case(kernel_device, [1, 4, 12], [9, 27, 12], 4, 2, 32, 8, torch.float32))


@pytest.mark.parametrize("window", [1, 5, 17, 40])
@pytest.mark.parametrize("block_size", [16, 32])
def test_sliding_window(kernel_device: str, window: int, block_size: int) -> None:
    # Windows shorter than the context and crossing block boundaries; decode and prefill rows.
    c = _case(kernel_device, [1, 20, 1, 7], [70, 45, 33, 7], 4, 2, 32, block_size,
              torch.float32, seed=window)
    _run_and_check(c, window=window)


def test_block_ids_above_2_16(kernel_device: str) -> None:
    """The used blocks are the top of a 65600-block pool (ids > 2^16)."""
    c = _case(kernel_device, [1, 3, 1], [40, 30, 17], 2, 1, 32, 16, torch.float16,
              num_blocks=65_600, top_ids=True)
    assert int(c["block_tables"].max()) > 2**16
    _run_and_check(c)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_split_kv_decode(kernel_device: str, num_splits: int) -> None:
    # seq_len 1 and 3 leave most splits empty; 95 spans several tiles per split.
    c = _case(kernel_device, [1, 1, 1, 1], [95, 1, 3, 40], 8, 2, 32, 16, torch.float32,
              seed=num_splits)
    _run_and_check(c, num_splits=num_splits)


def test_split_kv_bf16_window(kernel_device: str) -> None:
    c = _case(kernel_device, [1, 1], [90, 17], 4, 1, 64, 32, torch.bfloat16)
    _run_and_check(c, num_splits=3, window=37)


def test_split_kv_mixed_batch(kernel_device: str) -> None:
    """Forced splits also handle prefill rows."""
    c = _case(kernel_device, [1, 6, 1], [50, 20, 2], 4, 2, 32, 16, torch.float32)
    _run_and_check(c, num_splits=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_tile_shapes(kernel_device: str, monkeypatch: pytest.MonkeyPatch,
                         dtype: torch.dtype) -> None:
    """The bigger tiles picked for a real GPU (BLOCK_M 16..128, BLOCK_N 32/64) are correct too."""
    monkeypatch.setattr(TA, "interpreting", lambda: False)
    assert TA._tile_config(20, 4, 64, dtype)[1] == 64
    mixed = _case(kernel_device, [1, 20, 1], [80, 20, 3], 8, 2, 64, 16, dtype)
    _run_and_check(mixed, window=30)
    decode = _case(kernel_device, [1, 1, 1], [70, 1, 33], 8, 2, 64, 16, dtype)
    _run_and_check(decode, num_splits=2)


def test_strided_rows_and_surplus_grid(kernel_device: str) -> None:
    """query / out may be row-strided views; an overestimated max_query_len is harmless."""
    c = _case(kernel_device, [3, 1], [10, 18], 4, 2, 32, 16, torch.float32)
    wide = torch.randn(c["query"].shape[0], 6, 32, device=kernel_device)
    wide[:, :4] = c["query"]
    c["query"] = wide[:, :4]
    assert c["query"].stride(0) == 6 * 32
    _run_and_check(c, max_query_len=9)


def test_empty_batch(kernel_device: str) -> None:
    c = _case(kernel_device, [1], [5], 2, 1, 32, 16, torch.float32)
    out = torch.full_like(c["query"], SENTINEL)
    qsl = torch.zeros(1, dtype=torch.int32, device=kernel_device)
    lens = torch.zeros(0, dtype=torch.int32, device=kernel_device)
    res = TA.paged_attention(c["query"], c["kv_cache"], qsl, lens, c["block_tables"][:0], 1.0,
                             max_query_len=0, max_seq_len=0, out=out)
    assert res is out and (out == SENTINEL).all()


def test_auto_num_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TD.auto_num_splits(torch.device("cpu"), 2, 1, 8192, 64) == 1
    monkeypatch.setattr(TD, "interpreting", lambda: False)
    monkeypatch.setattr(TD, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    splits = TD.auto_num_splits(cuda, 8, 1, 8192, 64)
    assert 1 < splits <= 64 and 8 * splits >= 2 * 132
    assert TD.auto_num_splits(cuda, 8, 1, 1100, 64) == 8  # at least 2 tiles per split
    assert TD.auto_num_splits(cuda, 8, 2, 8192, 64) == 1  # not all-decode
    assert TD.auto_num_splits(cuda, 8, 1, 512, 64) == 1  # short contexts
    assert TD.auto_num_splits(cuda, 300, 1, 8192, 64) == 1  # enough programs already


def test_wrapper_errors(kernel_device: str) -> None:
    c = _case(kernel_device, [2, 1], [5, 9], 4, 2, 32, 16, torch.float32)
    args = (c["query"], c["kv_cache"], c["query_start_loc"], c["seq_lens"], c["block_tables"])
    kw = {"max_query_len": 2, "max_seq_len": 9}

    def call(*a: torch.Tensor, **extra) -> None:
        TA.paged_attention(*a, 0.5, **{**kw, **extra})

    q, cache, qsl, lens, tables = args
    with pytest.raises(ValueError, match="dtype"):
        call(q.to(torch.bfloat16), *args[1:])
    with pytest.raises(ValueError, match="dtype"):
        call(q.to(torch.int32), *args[1:])
    with pytest.raises(ValueError, match="head dim"):
        call(q[..., :16].contiguous(), *args[1:])
    with pytest.raises(ValueError, match="multiple"):
        call(q[:, :3].contiguous(), *args[1:])
    with pytest.raises(ValueError, match="int32"):
        call(q, cache, qsl.float(), lens, tables)
    with pytest.raises(ValueError, match="query_start_loc"):
        call(q, cache, qsl[:-1], lens, tables)
    with pytest.raises(ValueError, match="contiguous"):
        call(q, cache.transpose(3, 4), qsl, lens, tables)
    with pytest.raises(ValueError, match="stride"):
        call(q.transpose(1, 2).contiguous().transpose(1, 2), *args[1:])
    with pytest.raises(ValueError, match="out"):
        call(*args, out=torch.empty(q.shape[0], 4, 16, device=kernel_device))
    with pytest.raises(ValueError, match="sliding_window"):
        call(*args, sliding_window=0)
    with pytest.raises(ValueError, match="num_splits"):
        call(*args, num_splits=0)
