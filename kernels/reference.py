"""Pure-torch versions of the model's hot ops: the CPU path and the oracle for GPU kernels.

Layouts shared with every other implementation of these ops:
- activations are flat over tokens: [num_tokens, num_heads, head_dim] or [num_tokens, hidden];
- a layer's KV cache is [2, num_blocks, block_size, num_kv_heads, head_dim] (K then V);
- a cos/sin cache is [max_position, rotary_dim]: cos in the first half, sin in the second.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

Ints = Sequence[int] | torch.Tensor


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, statistics in float32.

    With `residual`, first adds it to `x` (in x's dtype, as the unfused model does) and
    returns (normed, x + residual) so the next layer can reuse the sum.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * normed.to(x.dtype)
    return out if residual is None else (out, x)


def _rope_inv_freq(rot_dim: int, base: float, scaling: Mapping[str, Any] | None,
                   max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rot_dim // 2] and the cos/sin magnitude for a rope variant."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq, 1.0
    assert scaling is not None
    factor = float(scaling.get("factor") or 1.0)
    if rope_type == "linear":
        return inv_freq / factor, 1.0
    if rope_type == "llama3":
        low = float(scaling["low_freq_factor"])
        high = float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are stretched by `factor`, short ones kept, the band between blended.
        smooth = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        long = wavelen > old_len / low
        short = wavelen < old_len / high
        return torch.where(long, inv_freq / factor, torch.where(short, inv_freq, blended)), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, rot_dim, base, scaling, factor, max_position)
    raise ValueError(
        f"unsupported rope type {rope_type!r}; supported: default, linear, llama3, yarn"
    )


def _yarn_inv_freq(inv_freq: torch.Tensor, rot_dim: int, base: float,
                   scaling: Mapping[str, Any], factor: float,
                   max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, rescale cos/sin."""
    old_len = float(scaling.get("original_max_position_embeddings") or max_position)
    if not scaling.get("factor"):
        factor = max_position / old_len

    def dim_for_rotations(n_rot: float) -> float:
        # The rotary dim whose wavelength completes n_rot turns over the original context.
        return rot_dim * math.log(old_len / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    lo = dim_for_rotations(float(scaling.get("beta_fast") or 32))
    hi = dim_for_rotations(float(scaling.get("beta_slow") or 1))
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, rot_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = scaling.get("attention_factor")
    if attn is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    return inv_freq, float(attn)


def build_cos_sin_cache(
    rot_dim: int, max_position: int, base: float,
    rope_scaling: Mapping[str, Any] | None = None, device: torch.device | str | None = None,
) -> torch.Tensor:
    """float32 [max_position, rot_dim]: cos(p * f) for each frequency f, then sin(p * f)."""
    inv_freq, magnitude = _rope_inv_freq(rot_dim, base, rope_scaling, max_position)
    pos = torch.arange(max_position, dtype=torch.float32)
    angles = torch.outer(pos, inv_freq)
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1) * magnitude
    return cache.to(device) if device is not None else cache


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """Rotate x [T, H, rot_dim] by per-token cos/sin [T, 1, rot_dim // 2], in float32."""
    xf = x.float()
    if is_neox:  # pairs are (i, i + rot_dim / 2)
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]  # GPT-J style: pairs are (2i, 2i + 1)
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).to(x.dtype)


def rotary_embedding(
    positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
    cos_sin_cache: torch.Tensor, head_dim: int, is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rope to query [T, Hq * D] / [T, Hq, D] and key; returns new tensors, same shapes.

    Only the first cos_sin_cache.shape[-1] dims of each head rotate (partial rotary).
    """
    rot_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(1).chunk(2, dim=-1)
    out = []
    for x in (query, key):
        xh = x.reshape(x.shape[0], -1, head_dim)
        rotated = _rotate(xh[..., :rot_dim], cos, sin, is_neox)
        if rot_dim < head_dim:
            rotated = torch.cat([rotated, xh[..., rot_dim:]], dim=-1)
        out.append(rotated.reshape(x.shape))
    return out[0], out[1]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2 * I] -> [..., I]: silu(gate) * up, gate being the first half."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store key/value [T, Hkv, D] at flat slots (block_id * block_size + offset), in place.

    Every slot must be valid: callers trim padded tokens rather than marking them.
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    slots = slot_mapping.to(torch.int64)
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))


class Workspace:
    """A grow-only scratch buffer.

    Decode gathers tens of MB of K/V per layer; reusing one buffer avoids having the
    allocator map (and page-fault) fresh memory for every layer of every step.
    """

    def __init__(self) -> None:
        self._buf: torch.Tensor | None = None

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._buf
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buf = buf
        return buf[:numel]


def _as_list(x: Ints) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def _gather_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                   workspace: Workspace | None) -> torch.Tensor:
    """Copy blocks [..., n] of both K and V into [2, ..., n * block_size, Hkv, D]."""
    _, num_blocks, block_size, hkv, d = kv_cache.shape
    idx = block_ids.reshape(-1).to(torch.int64)
    row = block_size * hkv * d
    if workspace is None:
        out = torch.empty(2, idx.numel(), row, dtype=kv_cache.dtype, device=kv_cache.device)
    else:
        out = workspace.get(2 * idx.numel() * row, kv_cache.dtype, kv_cache.device)
        out = out.view(2, idx.numel(), row)
    # 2-D index_select copies whole blocks as rows, far faster than 5-D advanced indexing.
    for i in range(2):
        torch.index_select(kv_cache[i].view(num_blocks, row), 0, idx, out=out[i])
    return out.view(2, *block_ids.shape[:-1], block_ids.shape[-1] * block_size, hkv, d)


def _key_mask(kpos: torch.Tensor, qpos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) visibility: query at p sees keys p - window < k <= p."""
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    return mask


def _decode(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, lens: torch.Tensor,
            lens_list: list[int], block_tables: torch.Tensor, scale: float,
            sliding_window: int | None, workspace: Workspace | None) -> None:
    """All single-token rows at once: gather each row's blocks into a padded batch."""
    n, hq, d = query.shape
    block_size, hkv = kv_cache.shape[2], kv_cache.shape[3]
    dev = query.device
    if sliding_window is None:
        width = -(-max(lens_list) // block_size)
        first = torch.zeros(n, 1, dtype=torch.int64, device=dev)
        block_ids = block_tables[:n, :width]
    else:  # only the blocks overlapping each row's window are read
        starts = [max(0, x - sliding_window) // block_size for x in lens_list]
        width = max(-(-x // block_size) - f for x, f in zip(lens_list, starts, strict=True))
        first = torch.tensor(starts, dtype=torch.int64, device=dev)[:, None]
        cols = (first + torch.arange(width, device=dev)).clamp_(max=block_tables.shape[1] - 1)
        block_ids = block_tables[:n].to(torch.int64).gather(1, cols)
    kv = _gather_blocks(kv_cache, block_ids, workspace)
    kpos = first * block_size + torch.arange(width * block_size, device=dev)
    # Keys past a row's length are padding; query position lens - 1 masks them too.
    mask = _key_mask(kpos, lens[:, None] - 1, sliding_window)
    # GQA: the query heads sharing a KV head become that head's "query rows".
    q = query.view(n, hkv, hq // hkv, d)
    o = F.scaled_dot_product_attention(
        q, kv[0].transpose(1, 2), kv[1].transpose(1, 2),
        attn_mask=mask[:, None, None, :], scale=scale,
    )
    out.copy_(o.reshape(n, hq, d))


def _context_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor,
                workspace: Workspace | None) -> torch.Tensor:
    """[2, n * block_size, Hkv, D] of these blocks: a view when their ids are consecutive
    (a prompt's blocks often are), else a gather."""
    first = int(block_ids[0])
    n = block_ids.numel()
    if int(block_ids[-1]) - first == n - 1 and (
            n < 3 or bool((block_ids[1:] - block_ids[:-1] == 1).all())):
        _, _, block_size, hkv, d = kv_cache.shape
        return kv_cache[:, first:first + n].reshape(2, n * block_size, hkv, d)
    return _gather_blocks(kv_cache, block_ids, workspace)


def _prefill_one(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor, seq_len: int,
                 block_table: torch.Tensor, scale: float, sliding_window: int | None,
                 workspace: Workspace | None = None) -> None:
    """One request's new tokens [n, Hq, D] against its whole (paged) context."""
    n = query.shape[0]
    block_size = kv_cache.shape[2]
    ctx = seq_len - n
    kstart = 0 if sliding_window is None else max(0, ctx - sliding_window + 1)
    b0 = kstart // block_size
    b1 = -(-seq_len // block_size)
    # A late chunk of a long prompt re-reads its whole context every layer: a reused
    # buffer (or a view) spares a fresh multi-MB allocation and its page faults each time.
    kv = _context_kv(kv_cache, block_table[b0:b1], workspace)[:, : seq_len - b0 * block_size]
    k, v = kv[0].transpose(0, 1)[None], kv[1].transpose(0, 1)[None]
    q = query.transpose(0, 1)[None]
    if ctx == 0 and sliding_window is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        dev = query.device
        qpos = torch.arange(ctx, seq_len, device=dev)[:, None]
        kpos = torch.arange(b0 * block_size, seq_len, device=dev)[None, :]
        mask = _key_mask(kpos, qpos, sliding_window)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    out.copy_(o[0].transpose(0, 1))


def paged_attention(
    query: torch.Tensor, kv_cache: torch.Tensor, query_start_loc: Ints, seq_lens: Ints,
    block_tables: torch.Tensor, scale: float, sliding_window: int | None = None,
    num_decodes: int = 0, out: torch.Tensor | None = None, workspace: Workspace | None = None,
) -> torch.Tensor:
    """Varlen attention of query [T, Hq, D] over K/V read through block tables.

    Request r owns query rows query_start_loc[r]:query_start_loc[r + 1] and has seq_lens[r]
    tokens of context including them, so its row i sits at position
    seq_lens[r] - query_len + i and sees keys at positions <= that (within the window).
    The first `num_decodes` requests have one query row each and run as one batch.
    Returns `out` (allocated if not given), [T, Hq, D].
    """
    hq, hkv = query.shape[1], kv_cache.shape[3]
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    qsl = _as_list(query_start_loc)
    lens_list = _as_list(seq_lens)
    if out is None:
        out = torch.empty_like(query)
    if num_decodes:
        if qsl[num_decodes] != num_decodes:
            raise ValueError("the first num_decodes requests must have one query row each")
        lens = (seq_lens if isinstance(seq_lens, torch.Tensor)
                else torch.tensor(lens_list, device=query.device))
        _decode(out[:num_decodes], query[:num_decodes], kv_cache,
                lens[:num_decodes].to(device=query.device, dtype=torch.int64),
                lens_list[:num_decodes], block_tables, scale, sliding_window, workspace)
    for r in range(num_decodes, len(lens_list)):
        s, e = qsl[r], qsl[r + 1]
        if e > s:
            _prefill_one(out[s:e], query[s:e], kv_cache, lens_list[r], block_tables[r],
                         scale, sliding_window, workspace)
    return out
