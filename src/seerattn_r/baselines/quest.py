"""Quest block scores: an upper bound of each query head's logit over a block's keys."""

from __future__ import annotations

import torch

from seerattn_r import ops


def quest_block_bounds(
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    cache_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise ``(min, max)`` of each block's valid post-RoPE keys.

    Args: as :func:`seerattn_r.ops.kpool` (``k_cache [B, Smax, Hkv, D]``, strided views
    allowed). Returns two ``[B, ceil(Smax / bs), Hkv, D]`` tensors in ``k_cache``'s dtype
    (0 for blocks with no valid token).
    """
    d = k_cache.shape[-1]
    pooled = ops.kpool(k_cache, cache_seqlens, block_size, cache_offsets)
    return pooled[..., d:2 * d], pooled[..., :d]


def quest_block_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    cache_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quest's criticality ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` per query head.

    Args:
        q: ``[B, Hq, D]`` post-RoPE decode query.
        k_cache, cache_seqlens, block_size, cache_offsets: as :func:`quest_block_bounds`.

    Returns:
        ``[B, Hq, ceil(Smax / bs)]`` fp32, one ranking per query head: select with
        :func:`seerattn_r.ops.select_blocks` (it accepts any leading head count) and a
        budget of at least 3 blocks, then pass the ``[B, Hq, M]`` indices to
        :func:`seerattn_r.ops.sparse_decode`.
    """
    batch, hq, d = q.shape
    hkv = k_cache.shape[2]
    kmin, kmax = quest_block_bounds(k_cache, cache_seqlens, block_size, cache_offsets)
    qg = q.float().view(batch, 1, hkv, hq // hkv, d)
    bound = torch.maximum(qg * kmin.float()[:, :, :, None], qg * kmax.float()[:, :, :, None]).sum(-1)
    return bound.flatten(2).transpose(1, 2).contiguous()
