"""Block hashing and the block pool: exact block ids, ref counts and eviction order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

from server.engine import block_hash
from server.engine.block_hash import hash_block_tokens, hash_token_blocks, update_block_hashes
from server.engine.block_pool import BlockPool, FreeBlockQueue, KVCacheBlock
from server.request import Request
from server.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]


def free_ids(pool: BlockPool) -> list[int]:
    return [b.block_id for b in pool.free_queue]


# ---- block_hash ------------------------------------------------------------------------


def test_hash_matches_documented_encoding() -> None:
    # Oracle: the byte layout written out by hand (tag, u64 parent, u32 count, i64 tokens).
    first = xxhash.xxh3_64_intdigest(b"\x00" + (3).to_bytes(4, "little") + b"".join(
        t.to_bytes(8, "little") for t in (1, 2, 3)))
    assert hash_block_tokens(None, [1, 2, 3]) == first
    second = xxhash.xxh3_64_intdigest(b"\x01" + first.to_bytes(8, "little")
                                      + (2).to_bytes(4, "little")
                                      + b"".join(t.to_bytes(8, "little") for t in (4, 5)))
    assert hash_block_tokens(first, (4, 5)) == second


def test_hash_is_chained_and_keyed() -> None:
    a = hash_block_tokens(None, [1, 2, 3, 4])
    assert hash_block_tokens(a, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    assert hash_block_tokens(None, [1, 2, 3, 4], extra_keys=(7,)) != a
    assert hash_block_tokens(None, [1, 2, 3, 4], extra_keys=("7",)) != \
        hash_block_tokens(None, [1, 2, 3, 4], extra_keys=(7,))
    # Parent 0 is a real parent, not "no parent".
    assert hash_block_tokens(0, [1, 2, 3, 4]) != a
    with pytest.raises(TypeError):
        hash_block_tokens(None, [1], extra_keys=(1.5,))  # type: ignore[arg-type]


def test_hash_is_stable_across_processes() -> None:
    code = ("from server.engine.block_hash import hash_token_blocks;"
            "print(hash_token_blocks(list(range(40)), 16, ('salt',)))")
    seen = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True)
        seen.add(res.stdout.strip())
    assert seen == {str(hash_token_blocks(list(range(40)), 16, ("salt",)))}


def test_hash_token_blocks_skips_partial_block() -> None:
    tokens = list(range(10))
    h = hash_token_blocks(tokens, 4)
    assert len(h) == 2
    assert h[0] == hash_block_tokens(None, [0, 1, 2, 3])
    assert h[1] == hash_block_tokens(h[0], [4, 5, 6, 7])
    assert hash_token_blocks(tokens, 16) == []


def test_update_block_hashes_is_incremental(monkeypatch: pytest.MonkeyPatch) -> None:
    req = Request("r", list(range(7)), SamplingParams())
    assert update_block_hashes(req, 4) == 1
    assert req.block_hashes == hash_token_blocks(list(range(7)), 4)

    calls: list[tuple[int, ...]] = []
    real = block_hash.hash_block_tokens

    def spy(parent, tokens, extra_keys=()):  # type: ignore[no-untyped-def]
        calls.append(tuple(tokens))
        return real(parent, tokens, extra_keys)

    monkeypatch.setattr(block_hash, "hash_block_tokens", spy)
    assert update_block_hashes(req, 4) == 0
    req.append_output_token(7)  # completes block 1
    assert update_block_hashes(req, 4) == 1
    assert calls == [(4, 5, 6, 7)]  # only the new block was hashed
    assert req.block_hashes == hash_token_blocks(list(range(8)), 4)


# ---- FreeBlockQueue --------------------------------------------------------------------


def test_free_queue_operations() -> None:
    blocks = [KVCacheBlock(i) for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert len(q) == 5 and [b.block_id for b in q] == [0, 1, 2, 3, 4]
    q.remove(blocks[2])  # middle
    q.remove(blocks[0])  # head
    q.remove(blocks[4])  # tail
    assert [b.block_id for b in q] == [1, 3] and len(q) == 2
    q.append(blocks[0])
    assert q.popleft() is blocks[1]
    assert [b.block_id for b in q] == [3, 0]
    with pytest.raises(ValueError):
        q.remove(blocks[2])  # not in the queue
    q.popleft()
    q.popleft()
    assert len(q) == 0
    with pytest.raises(IndexError):
        q.popleft()


# ---- BlockPool -------------------------------------------------------------------------


def test_allocation_order_and_usage() -> None:
    pool = BlockPool(5)
    assert pool.usage == 0.0 and pool.num_free_blocks == 5
    got = pool.get_new_blocks(3)
    assert [b.block_id for b in got] == [0, 1, 2]
    assert [b.ref_cnt for b in got] == [1, 1, 1]
    assert pool.num_free_blocks == 2
    assert pool.usage == pytest.approx(0.6)
    with pytest.raises(ValueError):
        pool.get_new_blocks(3)
    assert pool.num_free_blocks == 2  # failed request took nothing


def test_free_order_is_eviction_order() -> None:
    pool = BlockPool(5)
    got = pool.get_new_blocks(3)
    pool.free_blocks(reversed(got))  # tail block first
    assert free_ids(pool) == [3, 4, 2, 1, 0]
    assert [b.block_id for b in pool.get_new_blocks(5)] == [3, 4, 2, 1, 0]
    assert pool.usage == 1.0


def test_touch_and_free_ref_counts() -> None:
    pool = BlockPool(4)
    a, b, c = pool.get_new_blocks(3)
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and free_ids(pool) == [3, 1]
    pool.touch([b])  # revived out of the queue
    assert b.ref_cnt == 1 and free_ids(pool) == [3]
    pool.touch([b, a])
    assert (a.ref_cnt, b.ref_cnt) == (2, 2)
    pool.free_blocks([b])
    assert b.ref_cnt == 1 and free_ids(pool) == [3]
    pool.free_blocks([b])
    assert b.ref_cnt == 0 and free_ids(pool) == [3, 1]
    with pytest.raises(ValueError):
        pool.free_blocks([b])
    assert c.ref_cnt == 1


def test_lazy_eviction_and_reuse() -> None:
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [111, 222], [(1, 2), (3, 4)])
    pool.free_blocks(reversed(blocks))
    assert free_ids(pool) == [2, 1, 0]
    # Freed but still cached: a hit.
    assert pool.get_cached_block(111, [1, 2]) is blocks[0]
    assert pool.get_cached_block(222, (3, 4)) is blocks[1]
    # The never-used block goes first, then the tail block (1), which loses its hash.
    assert [b.block_id for b in pool.get_new_blocks(2)] == [2, 1]
    assert blocks[1].block_hash is None and blocks[1].token_ids is None
    assert pool.get_cached_block(222, (3, 4)) is None
    assert pool.get_cached_block(111, (1, 2)) is blocks[0]
    assert pool.cached_blocks == {111: blocks[0]}


def test_token_mismatch_on_equal_hash_is_a_miss() -> None:
    pool = BlockPool(2)
    (blk,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([blk], [42], [(1, 2, 3, 4)])
    assert pool.get_cached_block(42, [1, 2, 3, 5]) is None
    assert pool.get_cached_block(42, [1, 2, 3, 4]) is blk
    # A second block with the same hash does not displace the first entry.
    (other,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([other], [42], [(9, 9, 9, 9)])
    assert other.block_hash is None and pool.cached_blocks == {42: blk}


def test_caching_disabled_registers_nothing() -> None:
    pool = BlockPool(2, enable_caching=False)
    blocks = pool.get_new_blocks(1)
    pool.cache_full_blocks(blocks, [5], [(1,)])
    assert pool.cached_blocks == {} and blocks[0].block_hash is None


def test_reset_prefix_cache() -> None:
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [1, 2], [(1,), (2,)])
    pool.free_blocks(blocks[:1])
    assert pool.reset_prefix_cache() == 2
    assert pool.get_cached_block(1, (1,)) is None
    assert all(b.block_hash is None for b in pool.blocks)
    assert free_ids(pool) == [2, 0]
