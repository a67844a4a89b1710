"""``kpool``: max-, min- and mean-pooling of keys over each block of tokens."""

from __future__ import annotations

import torch

from seerattn_r import backend
from seerattn_r.ops import _checks as chk


def _check(k, cache_seqlens, block_size, cache_offsets) -> None:
    chk.tensor("k", k, 4, "[B, S, Hkv, D]")
    chk.dtype_in("k", k, chk.ATTN_DTYPES)
    chk.last_dim_contiguous("k", k)
    batch = k.shape[0]
    chk.int32_vector("cache_seqlens", cache_seqlens, batch, "tokens per row")
    chk.block_size(block_size)
    if cache_offsets is not None:
        chk.int32_vector("cache_offsets", cache_offsets, batch, "first token of each row")
    chk.same_device({"k": k, "cache_seqlens": cache_seqlens, "cache_offsets": cache_offsets})


@torch.library.custom_op("seerattn::kpool", mutates_args=())
def _kpool_op(
    k: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    cache_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    _check(k, cache_seqlens, block_size, cache_offsets)
    if chk.debug_enabled():
        chk.debug_lengths(cache_seqlens, cache_offsets, k.shape[1])
    return backend.resolve("kpool", k.device)(k, cache_seqlens, block_size, cache_offsets)


@_kpool_op.register_fake
def _(k, cache_seqlens, block_size, cache_offsets=None):
    _check(k, cache_seqlens, block_size, cache_offsets)
    batch, s, hkv, d = k.shape
    return k.new_empty(batch, (s + block_size - 1) // block_size, hkv, 3 * d)


def kpool(
    k: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    cache_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool each block of (pre-RoPE) keys into ``[max | min | mean]``, the gate's key input.

    Args:
        k: ``[B, S, Hkv, D]`` fp16/bf16/fp32, last dimension contiguous.
        cache_seqlens: ``[B]`` int32, valid tokens per row.
        block_size: tokens per block, one of 16, 32, 64, 128.
        cache_offsets: ``[B]`` int32 or None: row ``b``'s tokens start at
            ``k[b, cache_offsets[b]]`` (left padding), and its blocks are aligned to it.

    Returns:
        ``[B, ceil(S / block_size), Hkv, 3 * D]`` in k's dtype: max, min and mean over the
        valid tokens of each block (fp32 accumulation; a partial block is pooled over its
        valid tokens); a block with no valid token is all zeros. At decode, the same op
        pools the one-block recent-K buffer.
    """
    _check(k, cache_seqlens, block_size, cache_offsets)  # before the dispatcher's type checks
    return _kpool_op(k, cache_seqlens, block_size, cache_offsets)
