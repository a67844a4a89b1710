"""Reference fused gate selection (see :func:`seerattn_r.ops.gate_select`): by definition,
the reference scores followed by the reference selection."""

from __future__ import annotations

import torch

from seerattn_r.reference.gate_scores import gate_scores
from seerattn_r.reference.select_blocks import select_blocks


def gate_select(q_gate, k_gate, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block,
                sm_scale) -> torch.Tensor:
    """``[B, Hkv, M]`` int32 block ids, ascending, unique, -1 padded."""
    scores = gate_scores(q_gate, k_gate, num_blocks, sm_scale)
    return select_blocks(scores, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block)
