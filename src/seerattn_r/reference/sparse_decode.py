"""Reference block-sparse decode attention (see :func:`seerattn_r.ops.sparse_decode`)."""

from __future__ import annotations

import math

import torch

from seerattn_r.reference._rows import gather_rows


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    sm_scale: float,
    cache_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention of each query head over its selected blocks' tokens.

    A block mask is scattered from the indices, so order, -1 padding, duplicates and
    out-of-range blocks need no special case. Returns ``(out [B, Hq, Dv] q.dtype,
    lse [B, Hq] float32)``; a head with no valid token gets zeros and ``-inf``.
    """
    batch, hq, _ = q.shape
    smax, hkv = k_cache.shape[1], k_cache.shape[2]
    nblk = math.ceil(smax / block_size)
    length = nblk * block_size
    k, valid = gather_rows(k_cache, cache_seqlens, cache_offsets, length)
    v, _ = gather_rows(v_cache, cache_seqlens, cache_offsets, length)

    hsel = block_indices.shape[1]
    idx = block_indices.long()
    in_range = (idx >= 0) & (idx < nblk)
    chosen = torch.zeros(batch, hsel, nblk + 1, dtype=torch.bool, device=q.device)
    chosen.scatter_(2, torch.where(in_range, idx, nblk), True)
    chosen = chosen[..., :nblk]
    if hsel == hkv:  # the group shares its KV head's selection
        chosen = chosen.repeat_interleave(hq // hkv, dim=1)
    token_mask = chosen.repeat_interleave(block_size, dim=2) & valid[:, None, :]

    kh = k.repeat_interleave(hq // hkv, dim=2)  # [B, T, Hq, D]
    vh = v.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bhd,bthd->bht", q.float(), kh) * sm_scale
    scores = scores.masked_fill(~token_mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp(min=torch.finfo(torch.float32).min))
    probs = probs.masked_fill(~token_mask, 0.0)
    out = torch.einsum("bht,bthd->bhd", probs, vh)
    return out.to(q.dtype), lse
