"""KV cache manager: prefix hit lengths, stats, allocation failure, sibling sharing."""

from __future__ import annotations

import pytest

from server.engine import block_hash
from server.engine.kv_cache_manager import KVCacheManager, PrefixCacheStats
from server.request import Request
from server.sampling_params import SamplingParams

BS = 4


def req(rid: str, tokens: list[int], **params: object) -> Request:
    return Request(rid, tokens, SamplingParams(**params))  # type: ignore[arg-type]


def admit(kv: KVCacheManager, r: Request) -> list[int]:
    """What the scheduler does for a waiting request: lookup, allocate the rest."""
    hits, n_hit = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - n_hit, hits, n_hit) is not None
    r.num_computed_tokens = r.num_tokens
    return kv.get_block_ids(r.request_id)


def ref_cnts(kv: KVCacheManager) -> list[int]:
    return [b.ref_cnt for b in kv.pool.blocks]


def test_hit_lengths_and_last_token_cap() -> None:
    kv = KVCacheManager(BS, 16, True, 64)
    prompt = list(range(100, 110))  # 10 tokens: blocks [0..3] [4..7] + 2 partial
    a = req("a", prompt)
    assert kv.get_computed_blocks(a) == ([], 0)
    assert admit(kv, a) == [0, 1, 2]

    def hit(tokens: list[int], **params: object) -> tuple[list[int], int]:
        blocks, n = kv.get_computed_blocks(req("x", tokens, **params))
        return [b.block_id for b in blocks], n

    assert hit(prompt) == ([0, 1], 8)
    # Exactly two full blocks: the last token must be recomputed, so only one block hits.
    assert hit(prompt[:8]) == ([0], 4)
    assert hit(prompt[:9]) == ([0, 1], 8)
    assert hit(prompt[:4]) == ([], 0)
    assert hit(prompt[:5]) == ([0], 4)
    # Diverging inside the second block: the chain stops at the first.
    assert hit(prompt[:6] + [0, 0, 0, 0]) == ([0], 4)
    # Diverging in the first block: the second block's hash differs too (chained).
    assert hit([0] + prompt[1:]) == ([], 0)
    # Lookups alone count nothing: only admissions do (a request that does not fit is
    # looked up again every step).
    assert kv.prefix_cache_stats == PrefixCacheStats(queries=10, hits=0)
    admit(kv, req("c", prompt[:9]))
    assert kv.prefix_cache_stats == PrefixCacheStats(queries=19, hits=8)
    # Prompt logprobs need every position's logits: no lookup, not counted.
    assert hit(prompt, prompt_logprobs=0) == ([], 0)
    admit(kv, req("d", prompt, prompt_logprobs=0))
    assert kv.prefix_cache_stats == PrefixCacheStats(queries=19, hits=8)


def test_caching_disabled() -> None:
    kv = KVCacheManager(BS, 8, False, 64)
    prompt = list(range(12))
    admit(kv, req("a", prompt))
    assert kv.get_computed_blocks(req("b", prompt)) == ([], 0)
    assert kv.prefix_cache_stats == (0, 0)
    assert kv.pool.cached_blocks == {}


def test_blocks_cached_as_decode_fills_them() -> None:
    kv = KVCacheManager(BS, 8, True, 64)
    a = req("a", [1, 2, 3, 4, 5, 6, 7])
    admit(kv, a)
    assert len(kv.pool.cached_blocks) == 1
    a.append_output_token(8)  # decode step: token 8 completes block 1
    assert kv.allocate_slots(a, 1) == []  # still fits in two blocks
    a.num_computed_tokens += 1
    assert len(kv.pool.cached_blocks) == 2
    blocks, n = kv.get_computed_blocks(req("b", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert [b.block_id for b in blocks] == [0, 1] and n == 8
    a.append_output_token(9)
    new = kv.allocate_slots(a, 1)
    assert new is not None and [b.block_id for b in new] == [2]


def test_chunked_allocation_caches_only_full_blocks() -> None:
    kv = KVCacheManager(BS, 8, True, 64)
    a = req("a", list(range(10)))
    new = kv.allocate_slots(a, 6)  # first chunk: 6 of 10 tokens
    assert new is not None and [b.block_id for b in new] == [0, 1]
    assert len(kv.pool.cached_blocks) == 1  # block 1 holds only 2 computed tokens
    a.num_computed_tokens = 6
    new = kv.allocate_slots(a, 4)
    assert new is not None and [b.block_id for b in new] == [2]
    assert len(kv.pool.cached_blocks) == 2


def test_allocate_failure_leaves_state_untouched() -> None:
    kv = KVCacheManager(BS, 4, True, 64)
    prompt = list(range(12))
    a = req("a", prompt)
    assert admit(kv, a) == [0, 1, 2]
    kv.free(a)
    assert [b.block_id for b in kv.pool.free_queue] == [3, 2, 1, 0]
    assert kv.num_free_blocks == 4 and kv.usage == 0.0

    b = req("b", prompt + list(range(50, 58)))  # 20 tokens: 5 blocks, 3 of them hits
    hits, n = kv.get_computed_blocks(b)
    assert [x.block_id for x in hits] == [0, 1, 2] and n == 12
    # Reviving the 3 hits leaves 1 free block but 2 are needed.
    assert kv.allocate_slots(b, 8, hits, n) is None
    assert ref_cnts(kv) == [0, 0, 0, 0]
    assert [x.block_id for x in kv.pool.free_queue] == [3, 2, 1, 0]
    assert kv.get_block_ids("b") == []
    assert len(kv.pool.cached_blocks) == 3
    # A smaller step fits: 3 hits + 1 new block.
    new = kv.allocate_slots(b, 4, hits, n)
    assert new is not None and [x.block_id for x in new] == [3]
    assert kv.get_block_ids("b") == [0, 1, 2, 3]
    assert ref_cnts(kv) == [1, 1, 1, 1] and kv.num_free_blocks == 0 and kv.usage == 1.0


def test_siblings_share_prompt_blocks() -> None:
    kv = KVCacheManager(BS, 16, True, 64)
    prompt = list(range(10))
    sibs = [req(f"s{i}", prompt) for i in range(3)]
    # All three in one step: each lookup sees what the previous allocate cached.
    assert admit(kv, sibs[0]) == [0, 1, 2]
    assert admit(kv, sibs[1]) == [0, 1, 3]
    assert admit(kv, sibs[2]) == [0, 1, 4]
    assert ref_cnts(kv)[:5] == [3, 3, 1, 1, 1]
    assert kv.num_free_blocks == 11
    kv.free(sibs[0])
    assert ref_cnts(kv)[:5] == [2, 2, 0, 1, 1]
    for s in sibs[1:]:
        kv.free(s)
    assert kv.num_free_blocks == 16
    assert kv.prefix_cache_stats == (30, 16)


def test_tail_blocks_evicted_first_across_requests() -> None:
    kv = KVCacheManager(BS, 4, True, 64)
    a = req("a", list(range(9)))  # 2 full blocks + 1 partial
    admit(kv, a)
    kv.free(a)
    assert [b.block_id for b in kv.pool.free_queue] == [3, 2, 1, 0]
    c = req("c", [70, 71, 72, 73, 74])
    assert admit(kv, c) == [3, 2]  # the unused block, then a's partial tail
    # a's two full blocks are still cached...
    blocks, n = kv.get_computed_blocks(req("a2", list(range(9))))
    assert [b.block_id for b in blocks] == [0, 1] and n == 8
    d = req("d", [80, 81, 82])
    assert admit(kv, d) == [1]  # ...until a's later full block is the next victim
    blocks, n = kv.get_computed_blocks(req("a3", list(range(9))))
    assert [b.block_id for b in blocks] == [0] and n == 4


def test_hash_collision_is_verified_by_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_hash, "hash_block_tokens", lambda parent, tokens, extra=(): 7)
    kv = KVCacheManager(BS, 8, True, 64)
    admit(kv, req("a", [1, 2, 3, 4, 5]))
    assert kv.pool.cached_blocks.keys() == {7}
    # Same (forced) hash, different tokens: a miss, not a wrong hit.
    assert kv.get_computed_blocks(req("b", [9, 9, 9, 9, 5])) == ([], 0)
    blocks, n = kv.get_computed_blocks(req("c", [1, 2, 3, 4, 5]))
    assert [b.block_id for b in blocks] == [0] and n == 4


def test_free_unknown_and_max_model_len() -> None:
    kv = KVCacheManager(BS, 8, True, 8)
    kv.free(req("nobody", [1]))  # no-op
    assert kv.num_free_blocks == 8
    with pytest.raises(ValueError, match="max_model_len"):
        kv.allocate_slots(req("long", list(range(9))), 9)
    with pytest.raises(ValueError, match="power of two"):
        KVCacheManager(6, 8)


def test_reset_prefix_cache() -> None:
    kv = KVCacheManager(BS, 8, True, 64)
    admit(kv, req("a", list(range(9))))
    assert kv.reset_prefix_cache() == 2
    assert kv.get_computed_blocks(req("b", list(range(9)))) == ([], 0)


def test_siblings_share_with_caching_disabled_but_nobody_else() -> None:
    kv = KVCacheManager(BS, 16, False, 64)
    prompt = list(range(10))
    sibs = [Request(f"{i}_p", prompt, SamplingParams(n=2), share_key="p") for i in range(2)]
    assert admit(kv, sibs[0]) == [0, 1, 2]
    assert admit(kv, sibs[1]) == [0, 1, 3]
    assert admit(kv, req("stranger", prompt)) == [4, 5, 6]
    assert admit(kv, Request("q", prompt, SamplingParams(), share_key="q")) == [7, 8, 9]
    assert kv.prefix_cache_stats == (0, 0)  # sibling sharing is not prefix caching
