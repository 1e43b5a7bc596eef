"""Per-request block lists on top of the block pool: prefix lookup, allocate, free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from server.engine.block_hash import update_block_hashes
from server.engine.block_pool import BlockPool, KVCacheBlock
from server.request import Request


class PrefixCacheStats(NamedTuple):
    """Cumulative prefix-cache counters, in tokens."""

    queries: int
    hits: int


class KVCacheManager:
    """Which blocks each request holds, and which of its full blocks are in the prefix cache.

    Invariant: a request's blocks hold tokens [0, num_computed_tokens + scheduled) in order;
    the first num_cached_blocks of them are registered in the prefix cache.
    """

    def __init__(self, block_size: int, num_blocks: int, enable_caching: bool = True,
                 max_model_len: int | None = None) -> None:
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {block_size}")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.max_model_len = max_model_len
        # The pool always caches: with prefix caching off, n > 1 siblings still share
        # their prompt blocks under hashes salted with their share key (see _salt).
        self.pool = BlockPool(num_blocks, True)
        self._req_blocks: dict[str, list[KVCacheBlock]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self._queries = 0
        self._hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._queries, self._hits)

    def _salt(self, request: Request) -> tuple[str, ...] | None:
        """Extra hash keys for the request's blocks, or None when it takes no part in caching.

        Prefix caching on: every request, unsalted. Off: only siblings of one n > 1 request,
        salted with their share key so nobody else can hit their blocks.
        """
        if self.enable_caching:
            return ()
        return (request.share_key,) if request.share_key is not None else None

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest chain of cached full blocks matching the request's tokens.

        The hit stops one token short of the end (rounded down to a block), so the last
        token is always recomputed and yields logits. Requests asking for prompt logprobs
        skip the lookup: they need logits at every prompt position.
        """
        salt = self._salt(request)
        if salt is None or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        bs = self.block_size
        update_block_hashes(request, bs, salt)
        max_blocks = (request.num_tokens - 1) // bs
        tokens = request.all_token_ids
        hits: list[KVCacheBlock] = []
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block = self.pool.get_cached_block(block_hash, tokens[i * bs:(i + 1) * bs])
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * bs

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = (),
                       num_new_computed_tokens: int = 0) -> list[KVCacheBlock] | None:
        """Grow the request's blocks to hold this step's tokens; returns the new blocks.

        new_computed_blocks are prefix hits from get_computed_blocks (first schedule only).
        Returns None, changing nothing, when the pool cannot supply the blocks. Blocks that
        are full after this step are cached right away, so a request scheduled later in
        the same step can hit them: the runner writes a step's KV before any attention
        reads it.
        """
        req_id = request.request_id
        bs = self.block_size
        held = self._req_blocks.get(req_id)
        num_held = len(held) if held is not None else 0
        num_total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        if self.max_model_len is not None and num_total > self.max_model_len:
            raise ValueError(f"request {req_id} would hold {num_total} tokens, "
                             f"over max_model_len={self.max_model_len}")
        if held is not None and num_total <= num_held * bs and not new_computed_blocks:
            # Fast path for most decode steps: the last block still has room.
            if num_total // bs > self._num_cached_blocks[req_id]:
                self._cache_full_blocks(request, held, num_total // bs)
            return []
        num_needed = -(-num_total // bs) - num_held - len(new_computed_blocks)
        # Touching a free hit block takes it out of the free queue too.
        num_revived = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_revived:
            return None

        if held is None:
            held = self._req_blocks[req_id] = []
            self._num_cached_blocks[req_id] = 0
            # Count a lookup once per admission, not per retry of a request that did not fit.
            if self.enable_caching and request.sampling_params.prompt_logprobs is None:
                self._queries += request.num_tokens
                self._hits += num_new_computed_tokens
        if new_computed_blocks:
            self.pool.touch(new_computed_blocks)
            held.extend(new_computed_blocks)
            # Hits are already cached; only later blocks need registering.
            self._num_cached_blocks[req_id] = max(self._num_cached_blocks[req_id],
                                                  len(held))
        new_blocks = self.pool.get_new_blocks(num_needed) if num_needed > 0 else []
        held.extend(new_blocks)

        self._cache_full_blocks(request, held, num_total // bs)
        return new_blocks

    def _cache_full_blocks(self, request: Request, held: list[KVCacheBlock],
                           num_full: int) -> None:
        req_id = request.request_id
        start = self._num_cached_blocks[req_id]
        salt = self._salt(request)
        if num_full <= start or salt is None:
            return
        bs = self.block_size
        update_block_hashes(request, bs, salt)
        # Only tokens already known can be hashed (never binding without lookahead).
        num_full = min(num_full, len(request.block_hashes))
        tokens = request.all_token_ids
        self.pool.cache_full_blocks(
            held[start:num_full],
            request.block_hashes[start:num_full],
            [tokens[i * bs:(i + 1) * bs] for i in range(start, num_full)],
        )
        self._num_cached_blocks[req_id] = num_full

    def free(self, request: Request) -> None:
        """Release all the request's blocks, tail first so its last blocks are evicted first."""
        blocks = self._req_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free_blocks(reversed(blocks))

    def get_blocks(self, request_id: str) -> list[KVCacheBlock]:
        return self._req_blocks.get(request_id, [])

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._req_blocks.get(request_id, ())]

    def reset_prefix_cache(self) -> int:
        """Drop all cached hashes; returns how many blocks were uncached."""
        return self.pool.reset_prefix_cache()
