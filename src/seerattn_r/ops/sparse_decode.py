"""``sparse_decode``: exact attention of one decode query over selected KV-cache blocks."""

from __future__ import annotations

import math

import torch

from seerattn_r import backend
from seerattn_r.ops import _checks as chk


def _check(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    cache_offsets: torch.Tensor | None,
) -> None:
    chk.tensor("q", q, 3, "[B, Hq, D]")
    chk.tensor("k_cache", k_cache, 4, "[B, Smax, Hkv, D]")
    chk.tensor("v_cache", v_cache, 4, "[B, Smax, Hkv, Dv]")
    chk.dtype_in("q", q, chk.ATTN_DTYPES)
    chk.same_dtype("k_cache", k_cache, "q", q)
    chk.same_dtype("v_cache", v_cache, "q", q)
    batch, hq, d = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != d:
        raise ValueError(
            f"k_cache must have shape [B={batch}, Smax, Hkv, D={d}] to match q, got {tuple(k_cache.shape)}"
        )
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(
            f"v_cache must have shape [B, Smax, Hkv] = {tuple(k_cache.shape[:3])} like k_cache "
            f"(then Dv), got {tuple(v_cache.shape)}"
        )
    hkv = k_cache.shape[2]
    if hq % hkv != 0:
        raise ValueError(f"q's head count Hq={hq} must be a multiple of k_cache's Hkv={hkv}")
    chk.one_of("head dim D of q", d, chk.HEAD_DIMS)
    chk.one_of("head dim Dv of v_cache", v_cache.shape[3], chk.HEAD_DIMS)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        chk.last_dim_contiguous(name, t)
    chk.int32_vector("cache_seqlens", cache_seqlens, batch, "tokens per row")
    chk.tensor("block_indices", block_indices, 3, "[B, Hkv, M] or [B, Hq, M] int32")
    chk.dtype_in("block_indices", block_indices, (torch.int32,))
    if block_indices.shape[0] != batch or block_indices.shape[1] not in (hkv, hq):
        raise ValueError(
            f"block_indices must have shape [B={batch}, Hkv={hkv}, M] (shared by a GQA group) or "
            f"[B={batch}, Hq={hq}, M] (per query head), got {tuple(block_indices.shape)}"
        )
    chk.block_size(block_size)
    if cache_offsets is not None:
        chk.int32_vector("cache_offsets", cache_offsets, batch, "first token of each row")
    chk.same_device({
        "q": q, "k_cache": k_cache, "v_cache": v_cache, "cache_seqlens": cache_seqlens,
        "block_indices": block_indices, "cache_offsets": cache_offsets,
    })


@torch.library.custom_op("seerattn::sparse_decode", mutates_args=())
def _sparse_decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    sm_scale: float | None = None,
    cache_offsets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k_cache, v_cache, cache_seqlens, block_indices, block_size, cache_offsets)
    if chk.debug_enabled():
        chk.debug_lengths(cache_seqlens, cache_offsets, k_cache.shape[1])
        if block_indices.numel() and int(block_indices.min()) < -1:
            raise ValueError("block_indices must be >= -1 (-1 is padding) (SEERATTN_DEBUG check)")
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    impl = backend.resolve("sparse_decode", q.device)
    return impl(q, k_cache, v_cache, cache_seqlens, block_indices, block_size, scale, cache_offsets)


@_sparse_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_indices, block_size, sm_scale=None, cache_offsets=None):
    _check(q, k_cache, v_cache, cache_seqlens, block_indices, block_size, cache_offsets)
    batch, hq, _ = q.shape
    out = q.new_empty(batch, hq, v_cache.shape[-1])
    lse = q.new_empty(batch, hq, dtype=torch.float32)
    return out, lse


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    sm_scale: float | None = None,
    cache_offsets: torch.Tensor | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse flash decoding: each query head attends, with an exact softmax, to the
    tokens of its selected KV-cache blocks only.

    Args:
        q: ``[B, Hq, D]`` fp16/bf16/fp32, the decode step's (post-RoPE) query.
        k_cache: ``[B, Smax, Hkv, D]``, same dtype. Only the last dimension must be
            contiguous: pass transformers' ``[B, Hkv, S, D]`` cache as
            ``cache.transpose(1, 2)``, never a copy.
        v_cache: ``[B, Smax, Hkv, Dv]``, same dtype and layout rules.
        cache_seqlens: ``[B]`` int32, the number of tokens of each row.
        block_indices: ``[B, Hkv, M]`` int32 (a GQA group shares its KV head's selection)
            or ``[B, Hq, M]`` (one selection per query head, as Quest needs). Any order;
            ``-1`` is padding; duplicates count once; blocks at or past
            ``ceil(cache_seqlens[b] / block_size)`` contribute nothing.
        block_size: tokens per block, one of 16, 32, 64, 128.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        cache_offsets: ``[B]`` int32 or None. Row ``b``'s tokens are
            ``k_cache[b, off_b : off_b + cache_seqlens[b]]``, and block ``j`` is its tokens
            ``j*block_size ..``: a left-padded batch is served in place.
        return_lse: also return the log-sum-exp of each head's scores.

    Returns:
        ``out [B, Hq, Dv]`` in q's dtype (and ``lse [B, Hq]`` float32, natural log). A head
        with no valid token gets ``out = 0`` and ``lse = -inf``.

    D and Dv must be 64, 128 or 256. Backends: see :mod:`seerattn_r.backend` (the TileLang
    kernel takes fp16/bf16 with ``[B, Hkv, M]`` indices; other cases run on Triton there).
    """
    # Checked here too: the dispatcher would reject a wrong argument type with a less
    # helpful message before the op's own check runs.
    _check(q, k_cache, v_cache, cache_seqlens, block_indices, block_size, cache_offsets)
    out, lse = _sparse_decode_op(
        q, k_cache, v_cache, cache_seqlens, block_indices, block_size, sm_scale, cache_offsets
    )
    return (out, lse) if return_lse else out
