"""``attn_block_max``: causal attention plus the block-max target that gates are trained on."""

from __future__ import annotations

import math

import torch

from seerattn_r import backend
from seerattn_r.ops import _checks as chk


def _check(q, k, v, block_size, cu_seqlens, max_seqlen) -> None:
    chk.tensor("q", q, 4, "[B, S, Hq, D]")
    chk.tensor("k", k, 4, "[B, S, Hkv, D]")
    chk.tensor("v", v, 4, "[B, S, Hkv, Dv]")
    chk.dtype_in("q", q, chk.ATTN_DTYPES)
    chk.same_dtype("k", k, "q", q)
    chk.same_dtype("v", v, "q", q)
    batch, seqlen, hq, d = q.shape
    if k.shape[:2] != (batch, seqlen) or k.shape[3] != d:
        raise ValueError(f"k must have shape [B={batch}, S={seqlen}, Hkv, D={d}] to match q, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must have shape [B, S, Hkv] = {tuple(k.shape[:3])} like k (then Dv), got {tuple(v.shape)}")
    if hq % k.shape[2] != 0:
        raise ValueError(f"q's head count Hq={hq} must be a multiple of k's Hkv={k.shape[2]}")
    chk.one_of("head dim D of q", d, chk.HEAD_DIMS)
    chk.one_of("head dim Dv of v", v.shape[3], chk.HEAD_DIMS)
    for name, t in (("q", q), ("k", k), ("v", v)):
        chk.last_dim_contiguous(name, t)
    chk.block_size(block_size)
    if cu_seqlens is not None:
        chk.tensor("cu_seqlens", cu_seqlens, 1, "[N + 1] int32")
        chk.dtype_in("cu_seqlens", cu_seqlens, (torch.int32,))
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must hold at least 2 boundaries ([N + 1], N >= 1), got {cu_seqlens.shape[0]}")
        if batch != 1:
            raise ValueError(f"packed sequences (cu_seqlens given) need q of batch size 1, got B={batch}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if not 1 <= max_seqlen <= seqlen:
        raise ValueError(f"max_seqlen must be in [1, S={seqlen}], got {max_seqlen}")
    chk.same_device({"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens})


def _debug_check_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int, max_seqlen: int) -> None:
    """Contents check (syncs): boundaries ascending, inside the row, none longer than max_seqlen."""
    cu = cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) < 0 or int(lengths.min()) < 0 or int(cu[-1]) > seqlen:
        raise ValueError(f"cu_seqlens must ascend from >= 0 to <= S={seqlen} (SEERATTN_DEBUG check)")
    if int(lengths.max()) > max_seqlen:
        raise ValueError(
            f"max_seqlen={max_seqlen} is shorter than a sequence of {int(lengths.max())} tokens "
            "(SEERATTN_DEBUG check)"
        )


@torch.library.custom_op("seerattn::attn_block_max", mutates_args=())
def _attn_block_max_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    sm_scale: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v, block_size, cu_seqlens, max_seqlen)
    if chk.debug_enabled() and cu_seqlens is not None:
        _debug_check_cu_seqlens(cu_seqlens, q.shape[1], max_seqlen)
    impl = backend.resolve("attn_block_max", q.device)
    return impl(q, k, v, block_size, sm_scale, cu_seqlens, max_seqlen)


@_attn_block_max_op.register_fake
def _(q, k, v, block_size, sm_scale, cu_seqlens, max_seqlen):
    _check(q, k, v, block_size, cu_seqlens, max_seqlen)
    batch, seqlen, hq, _ = q.shape
    out = q.new_empty(batch, seqlen, hq, v.shape[3])
    nblk = (max_seqlen + block_size - 1) // block_size
    block_max = q.new_empty(batch, k.shape[2], seqlen, nblk, dtype=torch.float32)
    return out, block_max


def attn_block_max(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    sm_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention output and the gate's training target, in one attention pass.

    The target (DESIGN.md "Training") of the token at position ``t`` of its sequence is,
    for each key block ``j < t // block_size`` (blocks strictly before its own),
    ``max`` over the GQA group's query heads and the block's keys of
    ``softmax(q . k * sm_scale)``, renormalised to sum 1 over those blocks.

    Args:
        q: ``[B, S, Hq, D]`` fp16/bf16/fp32 post-RoPE queries.
        k: ``[B, S, Hkv, D]`` post-RoPE keys, same dtype (``Hq % Hkv == 0``).
        v: ``[B, S, Hkv, Dv]`` values, same dtype. Only the last dimension of q, k, v must
            be contiguous: transformers' ``[B, H, S, D]`` tensors pass as ``.transpose(1, 2)``.
        block_size: tokens per block, one of 16, 32, 64, 128.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        cu_seqlens: ``[N + 1]`` int32 or None. With it, ``B`` must be 1 and the row packs
            ``N`` sequences, sequence ``i`` being tokens ``cu_seqlens[i] .. cu_seqlens[i+1]-1``;
            each attends only within itself, with positions and blocks counted from its
            first token. Tokens after ``cu_seqlens[N]`` belong to none and get zeros.
        max_seqlen: upper bound on every sequence's length (default ``S``); it fixes
            ``Nblk = ceil(max_seqlen / block_size)`` without a host sync.

    Returns:
        ``out [B, S, Hq, Dv]`` in q's dtype (the layer's attention output) and
        ``block_max [B, Hkv, S, Nblk]`` float32, each row summing to 1 over its earlier blocks
        and 0 elsewhere (all zeros for ``t < block_size``, which has no earlier block).

    D and Dv must be 64, 128 or 256. The Triton kernel never materialises ``S x S``; the
    torch reference does (small sequences only). It compiles once per dtype, head dims,
    group size, block size and packed-or-not; lengths are runtime values.
    """
    chk.tensor("q", q, 4, "[B, S, Hq, D]")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    if max_seqlen is None:
        max_seqlen = q.shape[1]
    return _attn_block_max_op(q, k, v, block_size, scale, cu_seqlens, max_seqlen)
