"""Training-mode gate forward and the distillation loss.

For every position ``t`` of a sequence, the gate scores the complete blocks strictly
before its own block (``j < t // block_size``): the same causal block rule as the decode
path (scored blocks ``0 .. last - 1``) and as the ``attn_block_max`` target. Compressed
keys are RoPE'd at their block's first token, as in decode.
"""

from __future__ import annotations

import math

import torch

from seerattn_r.gate import AttnGate
from seerattn_r.ops.kpool import kpool


def sequence_gate_logits(
    gate: AttnGate,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    first: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate logits of positions ``first .. L - 1`` of one sequence.

    Args:
        gate: the layer's gate.
        q_pre: ``[L, Hq, D]`` pre-RoPE queries of the sequence (positions ``0 .. L-1``).
        k_pre: ``[L, Hkv, D]`` pre-RoPE keys.
        first: first position to score; ``block_size <= first < L`` (earlier positions
            have no complete earlier block).
        block_size: tokens per block.

    Returns:
        ``logits [Hkv, L - first, nb]`` fp32 with ``nb = (L - 1) // block_size`` (the blocks
        any position may see), ``-inf`` at blocks ``j >= t // block_size``, and the boolean
        ``mask [L - first, nb]`` of the blocks each position sees.
    """
    length = q_pre.shape[0]
    nb = (length - 1) // block_size
    device = q_pre.device
    complete = torch.tensor([nb * block_size], dtype=torch.int32, device=device)
    pooled = kpool(k_pre[None, : nb * block_size], complete, block_size)  # [1, nb, Hkv, 3D]
    starts = torch.arange(nb, device=device)[None] * block_size
    k_gate = gate.project_k(pooled.float(), starts)[0]  # [nb, Hkv, Dg]
    positions = torch.arange(first, length, device=device)
    q_gate = gate.project_q(q_pre[first:].float(), positions)  # [R, Hkv, Dg]
    # Scores in fp32 even under bf16 autocast: the KL compares small probabilities.
    with torch.autocast(device_type=device.type, enabled=False):
        logits = torch.einsum("rhe,nhe->hrn", q_gate.float(), k_gate.float()) / math.sqrt(gate.gate_dim)
    mask = torch.arange(nb, device=device)[None, :] < (positions // block_size)[:, None]
    return logits.masked_fill(~mask, float("-inf")), mask


def loss_rows(length: int, block_size: int, loss_slice_ratio: float) -> int:
    """First position of a sequence of ``length`` tokens that enters the loss: the last
    ``loss_slice_ratio`` of its positions, but never one without an earlier block.
    Returns ``length`` when no position qualifies."""
    first = max(length - int(math.ceil(length * loss_slice_ratio)), block_size)
    return min(first, length)


def layer_kl(
    gate: AttnGate,
    q_pre: torch.Tensor,
    k_pre: torch.Tensor,
    target: torch.Tensor,
    cu_seqlens: list[int],
    block_size: int,
    loss_slice_ratio: float,
) -> tuple[torch.Tensor, int]:
    """Summed KL divergence ``KL(target || softmax(gate logits))`` of one layer over the
    loss positions of every sequence of a packed row.

    Args:
        gate: the layer's gate (its parameters receive the gradient).
        q_pre: ``[1, T, Hq, D]`` pre-RoPE queries of the packed row.
        k_pre: ``[1, T, Hkv, D]`` pre-RoPE keys.
        target: ``[1, Hkv, T, Nblk]`` fp32 ground truth from ``attn_block_max``.
        cu_seqlens: the row's sequence boundaries (host ints).
        block_size: tokens per block.
        loss_slice_ratio: the trailing fraction of each sequence's positions in the loss.

    Returns:
        (sum over (KV head, position) of the KL, fp32 0-dim with grad; the number of
        (KV head, position) terms). Divide for the mean.
    """
    total = target.new_zeros(())
    count = 0
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        first = loss_rows(end - start, block_size, loss_slice_ratio)
        if first >= end - start:
            continue
        logits, mask = sequence_gate_logits(gate, q_pre[0, start:end], k_pre[0, start:end], first, block_size)
        log_q = torch.log_softmax(logits, dim=-1).masked_fill(~mask, 0.0)
        p = target[0, :, start + first : end, : logits.shape[-1]]
        total = total + (torch.xlogy(p, p) - p * log_q).sum()
        count += logits.shape[0] * logits.shape[1]
    return total, count
