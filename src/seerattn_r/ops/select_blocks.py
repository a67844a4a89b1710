"""``select_blocks``: which KV-cache blocks one decode step reads."""

from __future__ import annotations

import torch

from seerattn_r import backend
from seerattn_r.ops import _checks as chk


def num_selected_slots(nblk, block_size: int, token_budget: int | None):
    """``M``, the width of ``block_indices``, fixed by shapes and never by data: the
    scored selection takes at most ``token_budget // block_size`` slots (all ``Nblk`` with a
    threshold), and the sink and last blocks one each. ``nblk`` may be symbolic."""
    if token_budget is None:
        return nblk + 2
    return torch.sym_min(token_budget // block_size, nblk) + 2


def check_selection(batch: int, num_blocks, cache_seqlens, block_size, token_budget, threshold) -> None:
    """The selection's checks that do not need the scores (``gate_select`` never has them)."""
    chk.int32_vector("num_blocks", num_blocks, batch, "scored blocks per row")
    chk.int32_vector("cache_seqlens", cache_seqlens, batch, "tokens per row")
    chk.block_size(block_size)
    if (token_budget is None) == (threshold is None):
        raise ValueError(
            "give exactly one of token_budget (tokens to keep) or threshold (minimum block "
            f"probability); got token_budget={token_budget}, threshold={threshold}"
        )
    if token_budget is not None and token_budget < 0:
        raise ValueError(f"token_budget must be >= 0, got {token_budget}")


def _check(scores, num_blocks, cache_seqlens, block_size, token_budget, threshold) -> None:
    chk.tensor("scores", scores, 3, "[B, Hkv, Nblk] float32")
    chk.dtype_in("scores", scores, (torch.float32,))
    check_selection(scores.shape[0], num_blocks, cache_seqlens, block_size, token_budget, threshold)
    chk.same_device({"scores": scores, "num_blocks": num_blocks, "cache_seqlens": cache_seqlens})


@torch.library.custom_op("seerattn::select_blocks", mutates_args=())
def _select_blocks_op(
    scores: torch.Tensor,
    num_blocks: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    token_budget: int | None = None,
    threshold: float | None = None,
    sink_block: bool = True,
) -> torch.Tensor:
    _check(scores, num_blocks, cache_seqlens, block_size, token_budget, threshold)
    if chk.debug_enabled() and num_blocks.numel():
        if int(num_blocks.min()) < 0 or int(num_blocks.max()) > scores.shape[-1]:
            raise ValueError(f"num_blocks must lie in [0, Nblk={scores.shape[-1]}] (SEERATTN_DEBUG check)")
        if int(cache_seqlens.min()) < 0:
            raise ValueError("cache_seqlens must be >= 0 (SEERATTN_DEBUG check)")
    impl = backend.resolve("select_blocks", scores.device)
    return impl(scores, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block)


@_select_blocks_op.register_fake
def _(scores, num_blocks, cache_seqlens, block_size, token_budget=None, threshold=None, sink_block=True):
    _check(scores, num_blocks, cache_seqlens, block_size, token_budget, threshold)
    batch, hkv, nblk = scores.shape
    m = num_selected_slots(nblk, block_size, token_budget)
    return scores.new_empty(batch, hkv, m, dtype=torch.int32)


def select_blocks(
    scores: torch.Tensor,
    num_blocks: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    token_budget: int | None = None,
    threshold: float | None = None,
    sink_block: bool = True,
) -> torch.Tensor:
    """Pick the blocks each KV head reads at this decode step.

    Args:
        scores: ``[B, Hkv, Nblk]`` float32 block probabilities (from :func:`gate_scores`).
        num_blocks: ``[B]`` int32, how many leading blocks are scored (``j < num_blocks[b]``).
        cache_seqlens: ``[B]`` int32, tokens per row; the forced last block is
            ``(cache_seqlens[b] - 1) // block_size``.
        block_size: tokens per block, one of 16, 32, 64, 128.
        token_budget: keep the top ``token_budget // block_size`` scored blocks (all of
            them when a row has no more); ties go to the lower block id.
        threshold: or keep the scored blocks with probability ``> threshold``.
        sink_block: also force block 0 (the attention sink).

    Returns:
        ``block_indices [B, Hkv, M]`` int32: the kept blocks plus the forced ones
        (outside the budget), ascending and unique, then ``-1`` padding. ``M`` is
        ``min(token_budget // block_size, Nblk) + 2`` (``Nblk + 2`` with a threshold), so
        shapes never depend on data. A row with ``cache_seqlens[b] == 0`` gets no forced
        block (and, in the decode path, ``num_blocks[b] == 0``: all ``-1``).
    """
    _check(scores, num_blocks, cache_seqlens, block_size, token_budget, threshold)  # before the dispatcher's
    return _select_blocks_op(scores, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block)
