"""Gate scores and block selection in one pass over the logits (Triton).

``gate_select(...)`` returns exactly ``select_blocks(gate_scores(...), ...)`` of the Triton
backend, bit for bit, without writing or re-reading the probabilities: the logits kernel
of :mod:`.gate_scores` writes logits and per-chunk softmax partials, and the selection
kernel of :mod:`.select_blocks` recomputes each probability from them with the same
formula and the same order-independent row combine as the normalize kernel it replaces.
So the contract is the probabilities' (ties among equal fp32 probabilities go to the lower
block id, even where their logits differ), for the budget and the threshold alike. It
saves one launch and the normalize pass.
"""

from __future__ import annotations

from .gate_scores import gate_logits
from .select_blocks import launch


def gate_select(q_gate, k_gate, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block,
                sm_scale, chunks=None):
    """Launch the logits and selection kernels; inputs are validated.

    q_gate [B, Hkv, Dg], k_gate [B, Nblk, Hkv, Dg] (fp16/bf16/fp32, last dim contiguous),
    num_blocks / cache_seqlens [B] int32, exactly one of token_budget / threshold.
    Returns block_indices [B, Hkv, M] int32 as ``select_blocks`` does from the
    probabilities ``gate_scores(q_gate, k_gate, num_blocks, sm_scale)``. ``chunks``
    overrides the plan (tests). Compiles as those two kernels do.
    """
    logits, part, _ = gate_logits(q_gate, k_gate, num_blocks, sm_scale, chunks)
    return launch(logits, part, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block)
