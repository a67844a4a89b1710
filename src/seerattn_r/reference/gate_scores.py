"""Reference gate block probabilities (see :func:`seerattn_r.ops.gate_scores`)."""

from __future__ import annotations

import torch


def gate_scores(
    q_gate: torch.Tensor, k_gate: torch.Tensor, num_blocks: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """``softmax(q . k * sm_scale)`` over blocks ``j < num_blocks[b]``, 0 elsewhere:
    ``[B, Hkv, Nblk]`` float32."""
    nblk = k_gate.shape[1]
    logits = torch.einsum("bhd,bnhd->bhn", q_gate.float(), k_gate.float()) * sm_scale
    scored = torch.arange(nblk, device=q_gate.device)[None, :] < num_blocks.long()[:, None]
    logits = logits.masked_fill(~scored[:, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.nan_to_num(0.0)  # rows with nothing scored: -inf everywhere gives NaN
