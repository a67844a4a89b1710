"""Pure-PyTorch reference of ``attn_block_max``: the definition of the gate's training target.

Materialises the full ``S x S`` attention of each sequence, so it is meant for small
sequences (tests, CPU runs of tiny models); the Triton kernel is the long-sequence path.
"""

from __future__ import annotations

import torch


def _sequence_bounds(batch: int, seqlen: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, first token, length) of every sequence."""
    if cu_seqlens is None:
        return [(b, 0, seqlen) for b in range(batch)]
    cu = cu_seqlens.tolist()
    return [(0, cu[i], cu[i + 1] - cu[i]) for i in range(len(cu) - 1)]


def attn_block_max(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    sm_scale: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention output and the group-max, block-max attention target.

    Args:
        q: ``[B, S, Hq, D]`` post-RoPE queries.
        k: ``[B, S, Hkv, D]`` post-RoPE keys.
        v: ``[B, S, Hkv, Dv]`` values.
        block_size: tokens per key block.
        sm_scale: softmax scale of ``q . k``.
        cu_seqlens: ``[N + 1]`` int32 boundaries of packed sequences in the single row of a
            ``B == 1`` batch, or None (every row is one sequence of length ``S``).
        max_seqlen: longest sequence; fixes ``Nblk = ceil(max_seqlen / block_size)``.

    Returns:
        ``out [B, S, Hq, Dv]`` in ``q.dtype`` and ``block_max [B, Hkv, S, Nblk]`` fp32: for the
        token at position ``t`` of its sequence, ``max`` over the group's query heads and the
        block's keys of the attention probability, kept for blocks ``j < t // block_size``
        and renormalised to sum 1 over them (an all-zero row when ``t < block_size``).
        Tokens outside every sequence (after the last boundary) get zeros in both outputs.
    """
    batch, seqlen, hq, _ = q.shape
    hkv, dv = k.shape[2], v.shape[3]
    group = hq // hkv
    nblk = -(-max_seqlen // block_size)
    out = torch.zeros(batch, seqlen, hq, dv, dtype=q.dtype, device=q.device)
    block_max = torch.zeros(batch, hkv, seqlen, nblk, dtype=torch.float32, device=q.device)
    for b, start, length in _sequence_bounds(batch, seqlen, cu_seqlens):
        if length == 0:
            continue
        qs = q[b, start : start + length].float().transpose(0, 1)  # [Hq, L, D]
        ks = k[b, start : start + length].float().transpose(0, 1).repeat_interleave(group, 0)
        vs = v[b, start : start + length].float().transpose(0, 1).repeat_interleave(group, 0)
        pos = torch.arange(length, device=q.device)
        causal = pos[None, :] <= pos[:, None]
        probs = torch.softmax((qs @ ks.transpose(1, 2) * sm_scale).masked_fill(~causal, float("-inf")), dim=-1)
        out[b, start : start + length] = (probs @ vs).transpose(0, 1).to(q.dtype)

        nb = -(-length // block_size)
        padded = torch.nn.functional.pad(probs, (0, nb * block_size - length))
        per_head = padded.view(hq, length, nb, block_size).amax(-1)  # [Hq, L, nb]
        grouped = per_head.view(hkv, group, length, nb).amax(1)  # [Hkv, L, nb]
        earlier = torch.arange(nb, device=q.device)[None, :] < (pos // block_size)[:, None]
        grouped = grouped * earlier
        total = grouped.sum(-1, keepdim=True)
        grouped = torch.where(total > 0, grouped / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
        block_max[b, :, start : start + length, :nb] = grouped
    return out, block_max
