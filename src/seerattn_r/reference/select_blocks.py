"""Reference block selection (see :func:`seerattn_r.ops.select_blocks`)."""

from __future__ import annotations

import torch

from seerattn_r.ops.select_blocks import num_selected_slots


def select_blocks(
    scores: torch.Tensor,
    num_blocks: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    token_budget: int | None,
    threshold: float | None,
    sink_block: bool,
) -> torch.Tensor:
    """Selected block ids per (row, KV head), ascending, unique, -1 padded:
    ``[B, Hkv, M]`` int32."""
    batch, hkv, nblk = scores.shape
    device = scores.device
    j = torch.arange(nblk, device=device)
    scored = j[None, None, :] < num_blocks.long()[:, None, None]
    if token_budget is not None:
        k = token_budget // block_size
        # Stable descending sort: equal scores rank the lower block id first.
        order = torch.sort(
            scores.float().masked_fill(~scored, float("-inf")), dim=-1, descending=True,
            stable=True,
        ).indices
        rank = torch.empty_like(order).scatter_(-1, order, j.expand_as(order))
        keep = scored & (rank < k)
    else:
        keep = scored & (scores.float() > threshold)

    seqlens = cache_seqlens.long()[:, None, None]
    last = (seqlens - 1) // block_size
    nonempty = seqlens > 0
    forced = (j[None, None, :] == last) & nonempty
    if sink_block:
        forced = forced | ((j[None, None, :] == 0) & nonempty)
    keep = keep | forced

    m = num_selected_slots(nblk, block_size, token_budget)
    # Ascending ids first: sort by (not kept, id); a last block past the scores' range
    # (last >= Nblk) is appended after them.
    ids = torch.where(keep, j, nblk + j).sort(dim=-1).values
    ids = torch.where(ids < nblk, ids, -1)
    beyond = nonempty & (last >= nblk)
    width = max(m, nblk + 1)
    out = torch.full((batch, hkv, width), -1, dtype=torch.long, device=device)
    out[..., :nblk] = ids
    count = keep.sum(dim=-1, keepdim=True)
    out.scatter_(-1, count.clamp(max=width - 1), torch.where(beyond, last, -1).expand_as(count))
    return out[..., :m].to(torch.int32)
