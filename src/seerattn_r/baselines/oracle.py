"""Oracle block scores: the true attention the decode query pays to each block."""

from __future__ import annotations

import math

import torch


def aligned_rows(cache: torch.Tensor, seqlens: torch.Tensor, offsets: torch.Tensor | None,
                 length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache [B, Smax, H, D]`` (a strided view is fine) re-indexed by each row's token
    number: ``(rows [B, length, H, D] fp32, valid [B, length] bool)``. A copy: baselines only."""
    batch, smax = cache.shape[:2]
    t = torch.arange(length, device=cache.device)
    off = torch.zeros(batch, dtype=torch.long, device=cache.device) if offsets is None else offsets.long()
    src = off[:, None] + t
    valid = (t < seqlens.long()[:, None]) & (src < smax)
    src = src.clamp(max=smax - 1)
    rows = cache.gather(1, src[:, :, None, None].expand(-1, -1, *cache.shape[2:])).float()
    return rows, valid


def oracle_block_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    sm_scale: float | None = None,
    cache_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-max attention probability of the decode query, max over each GQA group.

    Args:
        q: ``[B, Hq, D]`` post-RoPE query of each row's last token (``cache_seqlens - 1``).
        k_cache: ``[B, Smax, Hkv, D]`` post-RoPE keys (e.g. transformers' cache
            ``.transpose(1, 2)``); row addressing as in :func:`seerattn_r.ops.sparse_decode`.
        cache_seqlens: ``[B]`` int32 tokens per row (the current one included).
        block_size: tokens per block.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        cache_offsets: ``[B]`` int32 first token of each row, or None (0).

    Returns:
        ``[B, Hkv, ceil(Smax / block_size)]`` fp32: for block ``j``, the largest softmax
        probability (over all valid tokens of the row) of any of its tokens under any query
        head of the group; 0 for blocks with no valid token. Rank it with
        :func:`seerattn_r.ops.select_blocks` (``num_blocks = (cache_seqlens - 1) // bs``).
    """
    batch, hq, d = q.shape
    hkv = k_cache.shape[2]
    nblk = math.ceil(k_cache.shape[1] / block_size)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    keys, valid = aligned_rows(k_cache, cache_seqlens, cache_offsets, nblk * block_size)
    logits = torch.einsum("bhgd,blhd->bhgl", q.float().view(batch, hkv, hq // hkv, d), keys) * scale
    probs = logits.masked_fill(~valid[:, None, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs.view(batch, hkv, hq // hkv, nblk, block_size).amax(dim=(2, 4))
