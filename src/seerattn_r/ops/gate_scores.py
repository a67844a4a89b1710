"""``gate_scores``: the gate's block probabilities for one decode step."""

from __future__ import annotations

import math

import torch

from seerattn_r import backend
from seerattn_r.ops import _checks as chk


def _check(q_gate, k_gate, num_blocks) -> None:
    chk.tensor("q_gate", q_gate, 3, "[B, Hkv, Dg]")
    chk.tensor("k_gate", k_gate, 4, "[B, Nblk, Hkv, Dg]")
    chk.dtype_in("q_gate", q_gate, chk.ATTN_DTYPES)
    chk.dtype_in("k_gate", k_gate, chk.ATTN_DTYPES)
    batch, hkv, dg = q_gate.shape
    if k_gate.shape[0] != batch or k_gate.shape[2] != hkv or k_gate.shape[3] != dg:
        raise ValueError(
            f"k_gate must have shape [B={batch}, Nblk, Hkv={hkv}, Dg={dg}] to match q_gate, "
            f"got {tuple(k_gate.shape)}"
        )
    chk.last_dim_contiguous("q_gate", q_gate)
    chk.last_dim_contiguous("k_gate", k_gate)
    chk.int32_vector("num_blocks", num_blocks, batch, "scored blocks per row")
    chk.same_device({"q_gate": q_gate, "k_gate": k_gate, "num_blocks": num_blocks})


@torch.library.custom_op("seerattn::gate_scores", mutates_args=())
def _gate_scores_op(
    q_gate: torch.Tensor,
    k_gate: torch.Tensor,
    num_blocks: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    _check(q_gate, k_gate, num_blocks)
    if chk.debug_enabled() and num_blocks.numel():
        lo, hi = int(num_blocks.min()), int(num_blocks.max())
        if lo < 0 or hi > k_gate.shape[1]:
            raise ValueError(
                f"num_blocks must lie in [0, Nblk={k_gate.shape[1]}], got [{lo}, {hi}] (SEERATTN_DEBUG check)"
            )
    scale = 1.0 / math.sqrt(q_gate.shape[-1]) if sm_scale is None else float(sm_scale)
    return backend.resolve("gate_scores", q_gate.device)(q_gate, k_gate, num_blocks, scale)


@_gate_scores_op.register_fake
def _(q_gate, k_gate, num_blocks, sm_scale=None):
    _check(q_gate, k_gate, num_blocks)
    return q_gate.new_empty(q_gate.shape[0], q_gate.shape[1], k_gate.shape[1], dtype=torch.float32)


def gate_scores(
    q_gate: torch.Tensor,
    k_gate: torch.Tensor,
    num_blocks: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """The gate's probability of each block for the current query.

    Args:
        q_gate: ``[B, Hkv, Dg]``, the gate query (projected, normed, RoPE'd).
        k_gate: ``[B, Nblk, Hkv, Dg]``, the K compression cache.
        num_blocks: ``[B]`` int32, blocks scored per row (``j < num_blocks[b]``); in the
            decode path ``(cache_seqlens - 1) // block_size``, the complete blocks before
            the current token's.
        sm_scale: default ``1 / sqrt(Dg)``.

    Returns:
        ``[B, Hkv, Nblk]`` float32: ``softmax(q_gate . k_gate * sm_scale)`` over the scored
        blocks, exactly 0 elsewhere (an all-zero row when ``num_blocks[b] == 0``).
    """
    _check(q_gate, k_gate, num_blocks)  # before the dispatcher's type checks
    return _gate_scores_op(q_gate, k_gate, num_blocks, sm_scale)
