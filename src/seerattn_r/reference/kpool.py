"""Reference block pooling of keys (see :func:`seerattn_r.ops.kpool`)."""

from __future__ import annotations

import math

import torch

from seerattn_r.reference._rows import gather_rows


def kpool(
    k: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    cache_offsets: torch.Tensor | None,
) -> torch.Tensor:
    """``[max | min | mean]`` of each block's valid tokens: ``[B, ceil(S/bs), Hkv, 3D]``
    in ``k.dtype``; a block with no valid token is all zeros."""
    batch, s, hkv, d = k.shape
    nblk = math.ceil(s / block_size)
    rows, valid = gather_rows(k, cache_seqlens, cache_offsets, nblk * block_size)
    rows = rows.view(batch, nblk, block_size, hkv, d)
    valid = valid.view(batch, nblk, block_size, 1, 1)
    count = valid.sum(dim=2)
    vmax = rows.masked_fill(~valid, float("-inf")).amax(dim=2)
    vmin = rows.masked_fill(~valid, float("inf")).amin(dim=2)
    mean = rows.masked_fill(~valid, 0.0).sum(dim=2) / count.clamp(min=1)
    pooled = torch.cat([vmax, vmin, mean], dim=-1)
    return pooled.masked_fill(count == 0, 0.0).to(k.dtype)
