"""``gate_select``: the gate's scores and the block selection of one decode step, fused."""

from __future__ import annotations

import math

import torch

from seerattn_r import backend
from seerattn_r.ops import _checks as chk
from seerattn_r.ops.gate_scores import _check as _check_scores
from seerattn_r.ops.select_blocks import check_selection, num_selected_slots


def _check(q_gate, k_gate, num_blocks, cache_seqlens, block_size, token_budget, threshold) -> None:
    # Plain checks only: this also runs while Dynamo traces the caller, where creating a
    # tensor (as a stand-in for the probabilities) broke the graph on torch 2.11.
    _check_scores(q_gate, k_gate, num_blocks)
    check_selection(q_gate.shape[0], num_blocks, cache_seqlens, block_size, token_budget, threshold)
    chk.same_device({"q_gate": q_gate, "cache_seqlens": cache_seqlens})


@torch.library.custom_op("seerattn::gate_select", mutates_args=())
def _gate_select_op(
    q_gate: torch.Tensor,
    k_gate: torch.Tensor,
    num_blocks: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    token_budget: int | None = None,
    threshold: float | None = None,
    sink_block: bool = True,
    sm_scale: float | None = None,
) -> torch.Tensor:
    _check(q_gate, k_gate, num_blocks, cache_seqlens, block_size, token_budget, threshold)
    scale = 1.0 / math.sqrt(q_gate.shape[-1]) if sm_scale is None else float(sm_scale)
    impl = backend.resolve("gate_select", q_gate.device)
    return impl(q_gate, k_gate, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block, scale)


@_gate_select_op.register_fake
def _(q_gate, k_gate, num_blocks, cache_seqlens, block_size, token_budget=None, threshold=None, sink_block=True,
      sm_scale=None):
    _check(q_gate, k_gate, num_blocks, cache_seqlens, block_size, token_budget, threshold)
    m = num_selected_slots(k_gate.shape[1], block_size, token_budget)
    return q_gate.new_empty(q_gate.shape[0], q_gate.shape[1], m, dtype=torch.int32)


def gate_select(
    q_gate: torch.Tensor,
    k_gate: torch.Tensor,
    num_blocks: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    token_budget: int | None = None,
    threshold: float | None = None,
    sink_block: bool = True,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """``select_blocks(gate_scores(q_gate, k_gate, num_blocks, sm_scale), num_blocks,
    cache_seqlens, ...)`` in one op: the decode step's block choice without writing the
    probabilities (the Triton kernel recomputes them from the logits, bit-identical to the
    two ops of the same backend).

    Args:
        q_gate: ``[B, Hkv, Dg]``, the gate query.
        k_gate: ``[B, Nblk, Hkv, Dg]``, the K compression cache.
        num_blocks: ``[B]`` int32, blocks scored per row (``j < num_blocks[b]``).
        cache_seqlens: ``[B]`` int32, tokens per row (the forced last block).
        block_size, token_budget, threshold, sink_block: as :func:`select_blocks`.
        sm_scale: default ``1 / sqrt(Dg)``.

    Returns:
        ``block_indices [B, Hkv, M]`` int32, as :func:`select_blocks`.
    """
    _check(q_gate, k_gate, num_blocks, cache_seqlens, block_size, token_budget, threshold)
    return _gate_select_op(q_gate, k_gate, num_blocks, cache_seqlens, block_size, token_budget, threshold,
                           sink_block, sm_scale)
