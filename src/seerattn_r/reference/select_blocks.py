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

    # Candidates: the kept scored blocks, then the forced sink and last blocks (which may lie
    # at or past Nblk); "none" is a sentinel above every id. Ascending, duplicates dropped.
    none = torch.iinfo(torch.long).max
    seqlens = cache_seqlens.long()[:, None, None].expand(batch, hkv, 1)
    nonempty = seqlens > 0
    last = torch.where(nonempty, (seqlens - 1) // block_size, none)
    sink = torch.where(nonempty & sink_block, 0, none)
    cand = torch.cat([torch.where(keep, j, none), sink, last], dim=-1).sort(dim=-1).values
    repeat = torch.zeros_like(cand, dtype=torch.bool)
    repeat[..., 1:] = cand[..., 1:] == cand[..., :-1]
    cand = torch.where(repeat, none, cand).sort(dim=-1).values

    m = num_selected_slots(nblk, block_size, token_budget)
    return torch.where(cand == none, -1, cand)[..., :m].to(torch.int32)
