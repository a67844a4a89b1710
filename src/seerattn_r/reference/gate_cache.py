"""Reference K compression cache ops (see :func:`seerattn_r.ops.gate_keys` and
:func:`seerattn_r.ops.gate_cache_append`)."""

from __future__ import annotations

import torch

from seerattn_r.reference.gate_project_q import norm_rope
from seerattn_r.reference.kpool import kpool


def _entries(pooled, starts, weight, norm_weight, inv_freq, attention_scaling, eps, dtype) -> torch.Tensor:
    """``pooled [B, N, Hkv, 3D]`` -> entries ``[B, N, Hkv, Dg]`` RoPE'd at ``starts [B, N]``."""
    # One [1, 3D] x [3D, Dg] product per (row, block, head), whatever N is, so a block's
    # entry does not depend on how many blocks were computed with it.
    y = torch.matmul(pooled.float().unsqueeze(-2), weight.float()).squeeze(-2)
    return norm_rope(y, norm_weight, inv_freq, starts, attention_scaling, eps).to(dtype)


def gate_keys(
    k: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    eps: float,
    cache_offsets: torch.Tensor | None,
) -> torch.Tensor:
    """Entry of every block of ``k [B, S, Hkv, D]``: ``[B, ceil(S/bs), Hkv, Dg]`` in k's
    dtype; ``kpool`` (rounded to k's dtype), then fp32 projection, RMSNorm, RoPE at
    ``j * block_size``."""
    pooled = kpool(k, cache_seqlens, block_size, cache_offsets)
    batch, nblk = pooled.shape[:2]
    starts = (torch.arange(nblk, device=k.device) * block_size).expand(batch, nblk)
    return _entries(pooled, starts, weight, norm_weight, inv_freq, attention_scaling, eps, k.dtype)


def gate_cache_append(
    k_new: torch.Tensor,
    recent: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float,
    eps: float,
) -> None:
    """In place: ``recent[b, pos % bs] = k_new[b]``; rows whose block completes
    (``pos % bs == bs - 1``, ``pos // bs < C``) get ``keys[b, pos // bs]``."""
    batch, block_size = recent.shape[:2]
    rows = torch.arange(batch, device=recent.device)
    pos = positions.long()
    recent[rows, pos % block_size] = k_new.to(recent.dtype)
    full = torch.full((batch,), block_size, dtype=torch.int32, device=recent.device)
    pooled = kpool(recent, full, block_size, None)
    last = torch.div(pos, block_size, rounding_mode="floor")
    entry = _entries(pooled, (last * block_size)[:, None], weight, norm_weight, inv_freq, attention_scaling, eps,
                     recent.dtype)[:, 0]
    done = (pos % block_size == block_size - 1) & (last < keys.shape[1])
    idx = last.clamp(max=keys.shape[1] - 1)
    keys[rows, idx] = torch.where(done[:, None, None], entry.to(keys.dtype), keys[rows, idx])
