"""Chained content hashes of full KV blocks, the keys of the prefix cache.

A block's hash covers its parent's hash, so equal hashes mean equal prefixes, not just
equal blocks. xxh3 over a fixed little-endian byte encoding keeps the value identical
across processes and runs (Python's hash() is salted per process).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import xxhash

from server.request import Request

ExtraKey = int | str

# Distinct from any u64 parent: a 1-byte tag says whether a parent follows.
_NO_PARENT = b"\x00"
_PARENT_TAG = b"\x01"


def _encode_extra_keys(extra_keys: Sequence[ExtraKey]) -> bytes:
    parts: list[bytes] = []
    for key in extra_keys:
        if isinstance(key, int):
            parts.append(b"i" + struct.pack("<q", key))
        elif isinstance(key, str):
            raw = key.encode("utf-8")
            parts.append(b"s" + struct.pack("<I", len(raw)) + raw)
        else:
            raise TypeError(f"extra key must be int or str, got {type(key).__name__}")
    return b"".join(parts)


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int],
                      extra_keys: Sequence[ExtraKey] = ()) -> int:
    """64-bit hash of one block given its parent's hash (None for the first block).

    extra_keys carry anything besides token ids that changes the KV (e.g. an adapter id
    or a cache salt); blocks with different extra keys never share a hash by design.
    """
    head = _NO_PARENT if parent_hash is None else _PARENT_TAG + struct.pack("<Q", parent_hash)
    body = struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids)
    tail = _encode_extra_keys(extra_keys) if extra_keys else b""
    return xxhash.xxh3_64_intdigest(head + body + tail)


def hash_token_blocks(token_ids: Sequence[int], block_size: int,
                      extra_keys: Sequence[ExtraKey] = ()) -> list[int]:
    """Chained hashes of every full block of token_ids (a trailing partial block is skipped)."""
    hashes: list[int] = []
    parent: int | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size], extra_keys)
        hashes.append(parent)
    return hashes


def update_block_hashes(request: Request, block_size: int,
                        extra_keys: Sequence[ExtraKey] = ()) -> int:
    """Extend request.block_hashes to cover all its full blocks; returns how many were added.

    Only blocks that became full since the last call are hashed, so calling this every
    step costs O(new blocks).
    """
    hashes = request.block_hashes
    tokens = request.all_token_ids
    num_full = len(tokens) // block_size
    start = len(hashes)
    parent = hashes[-1] if hashes else None
    for i in range(start, num_full):
        parent = hash_block_tokens(parent, tokens[i * block_size:(i + 1) * block_size],
                                   extra_keys)
        hashes.append(parent)
    return num_full - start if num_full > start else 0
