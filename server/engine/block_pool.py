"""KV blocks, their ref counts, the O(1) eviction-ordered free list and the prefix-cache map.

A block with ref_cnt 0 sits in the free queue but keeps its hash (lazy eviction): a later
request can still hit it and pull it back out. Its hash is dropped only when the block is
handed out again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence


class KVCacheBlock:
    """One fixed-size slot range of the paged KV cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        # Set only while the block is registered in the prefix cache.
        self.block_hash: int | None = None
        # The full block's token ids, compared on every hit so a hash collision is a miss.
        self.token_ids: tuple[int, ...] | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, head evicted first; every operation is O(1).

    The links live on the blocks themselves, so removing a block that a prefix hit
    revives needs no search.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock] = ()) -> None:
        # Sentinels spare every operation the empty/edge special cases.
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("pop from an empty free block queue")
        self.remove(block)
        return block

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        assert last is not None
        block.prev_free = last
        block.next_free = self._tail
        last.next_free = block
        self._tail.prev_free = block
        self._len += 1

    def remove(self, block: KVCacheBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"{block} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def __iter__(self) -> Iterator[KVCacheBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free


class BlockPool:
    """All KV blocks of one cache: allocation, ref counting and the hash -> block map."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[int, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no owner, cached ones included (they are evictable)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by some request; 0.0 when all are free."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Pop n blocks from the head of the free queue, each with ref_cnt 1.

        A popped block that still has a hash is evicted from the prefix cache here.
        """
        if n > len(self.free_queue):
            raise ValueError(f"cannot allocate {n} blocks, {len(self.free_queue)} free")
        out: list[KVCacheBlock] = []
        for _ in range(n):
            block = self.free_queue.popleft()
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the queue tail.

        Pass them in eviction order (a request's blocks reversed, so its tail goes first).
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of {block}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on prefix-hit blocks, reviving free ones out of the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def get_cached_block(self, block_hash: int,
                         token_ids: Sequence[int]) -> KVCacheBlock | None:
        """The cached block for this hash, or None; differing token ids count as a miss."""
        block = self.cached_blocks.get(block_hash)
        if block is None or block.token_ids != tuple(token_ids):
            return None
        return block

    def cache_full_blocks(self, blocks: Sequence[KVCacheBlock], block_hashes: Sequence[int],
                          block_token_ids: Sequence[Sequence[int]]) -> None:
        """Register full blocks under their hashes (parallel sequences).

        Blocks already cached are skipped, and so is a block whose hash another block
        already holds (same content computed twice): the first one stays the cache entry.
        """
        if not self.enable_caching:
            return
        for block, block_hash, tokens in zip(blocks, block_hashes, block_token_ids,
                                             strict=True):
            if block.block_hash is not None or block_hash in self.cached_blocks:
                continue
            block.block_hash = block_hash
            block.token_ids = tuple(tokens)
            self.cached_blocks[block_hash] = block

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (e.g. after new weights); returns how many were dropped."""
        num = len(self.cached_blocks)
        for block in self.cached_blocks.values():
            block.block_hash = None
            block.token_ids = None
        self.cached_blocks.clear()
        return num

    def _evict(self, block: KVCacheBlock) -> None:
        block_hash = block.block_hash
        if block_hash is not None and self.cached_blocks.get(block_hash) is block:
            del self.cached_blocks[block_hash]
        block.block_hash = None
        block.token_ids = None
