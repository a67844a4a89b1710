"""The K compression cache ops: ``gate_keys`` (the entries of a prompt's blocks) and
``gate_cache_append`` (one decode step, in place). An entry is the block's pre-RoPE keys
pooled ``[max | min | mean]`` (as :func:`~seerattn_r.ops.kpool` pools them), times
``Wk [Hkv, 3D, Dg]``, RMS-normed and RoPE'd at the block's first position."""

from __future__ import annotations

import torch

from seerattn_r import backend
from seerattn_r.ops import _checks as chk
from seerattn_r.ops.gate_project_q import RMS_EPS, check_gate_params, check_positions


def _check_keys_params(d: int, weight, norm_weight, inv_freq) -> None:
    check_gate_params(weight, (None, 3 * d, None), f"[Hkv, 3D={3 * d}, Dg]", norm_weight, inv_freq)


def _check_keys(k, cache_seqlens, block_size, weight, norm_weight, inv_freq, cache_offsets) -> None:
    chk.tensor("k", k, 4, "[B, S, Hkv, D]")
    chk.dtype_in("k", k, chk.ATTN_DTYPES)
    chk.last_dim_contiguous("k", k)
    batch, _, hkv, d = k.shape
    _check_keys_params(d, weight, norm_weight, inv_freq)
    if weight.shape[0] != hkv:
        raise ValueError(f"weight must have Hkv={hkv} heads to match k, got {tuple(weight.shape)}")
    chk.int32_vector("cache_seqlens", cache_seqlens, batch, "tokens per row")
    chk.block_size(block_size)
    if cache_offsets is not None:
        chk.int32_vector("cache_offsets", cache_offsets, batch, "first token of each row")
    chk.same_device({"k": k, "cache_seqlens": cache_seqlens, "cache_offsets": cache_offsets, "weight": weight,
                     "norm_weight": norm_weight, "inv_freq": inv_freq})


@torch.library.custom_op("seerattn::gate_keys", mutates_args=())
def _gate_keys_op(
    k: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = RMS_EPS,
    cache_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    _check_keys(k, cache_seqlens, block_size, weight, norm_weight, inv_freq, cache_offsets)
    if chk.debug_enabled():
        chk.debug_lengths(cache_seqlens, cache_offsets, k.shape[1])
    impl = backend.resolve("gate_keys", k.device)
    return impl(k, cache_seqlens, block_size, weight, norm_weight, inv_freq, attention_scaling, eps, cache_offsets)


@_gate_keys_op.register_fake
def _(k, cache_seqlens, block_size, weight, norm_weight, inv_freq, attention_scaling=1.0, eps=RMS_EPS,
      cache_offsets=None):
    _check_keys(k, cache_seqlens, block_size, weight, norm_weight, inv_freq, cache_offsets)
    batch, s, hkv, _ = k.shape
    return k.new_empty(batch, (s + block_size - 1) // block_size, hkv, weight.shape[-1])


def gate_keys(
    k: torch.Tensor,
    cache_seqlens: torch.Tensor,
    block_size: int,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = RMS_EPS,
    cache_offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """The compression-cache entry of every block of a prompt (``kpool`` + ``project_k``
    fused).

    Args:
        k: ``[B, S, Hkv, D]`` pre-RoPE keys, fp16/bf16/fp32, last dim contiguous.
        cache_seqlens: ``[B]`` int32 valid tokens per row.
        block_size: tokens per block, one of 16, 32, 64, 128.
        weight: ``[Hkv, 3D, Dg]`` contiguous (``attngate_linear_k.weight``).
        norm_weight: ``[Dg]`` (``attngate_knorm.weight``).
        inv_freq: ``[Dg/2]`` float32 RoPE frequencies.
        attention_scaling: multiplies cos and sin.
        eps: RMSNorm epsilon.
        cache_offsets: ``[B]`` int32 or None: row ``b``'s tokens start at ``k[b, offsets[b]]``.

    Returns:
        ``[B, ceil(S / block_size), Hkv, Dg]`` in k's dtype: block ``j`` pooled over its
        valid tokens (rounded to k's dtype), projected, normed and RoPE'd at position
        ``j * block_size`` in fp32. Blocks with no valid token pool to zeros. The Triton
        kernel gives bit for bit the entries :func:`gate_cache_append` computes.
    """
    _check_keys(k, cache_seqlens, block_size, weight, norm_weight, inv_freq, cache_offsets)
    return _gate_keys_op(k, cache_seqlens, block_size, weight, norm_weight, inv_freq, attention_scaling, eps,
                         cache_offsets)


def _check_append(k_new, recent, keys, positions, weight, norm_weight, inv_freq) -> None:
    chk.tensor("recent", recent, 4, "[B, block_size, Hkv, D]")
    chk.dtype_in("recent", recent, chk.ATTN_DTYPES)
    batch, block_size, hkv, d = recent.shape
    if not isinstance(block_size, torch.SymInt):  # symbolic only in opcheck's dynamic-shape trace
        chk.block_size(block_size)
    chk.tensor("k_new", k_new, 3, f"[B={batch}, Hkv={hkv}, D={d}]")
    if tuple(k_new.shape) != (batch, hkv, d):
        raise ValueError(f"k_new must have shape [B={batch}, Hkv={hkv}, D={d}] to match recent, "
                         f"got {tuple(k_new.shape)}")
    _check_keys_params(d, weight, norm_weight, inv_freq)
    dg = weight.shape[-1]
    chk.tensor("keys", keys, 4, f"[B={batch}, C, Hkv={hkv}, Dg={dg}]")
    if keys.shape[0] != batch or keys.shape[2:] != (hkv, dg) or weight.shape[0] != hkv:
        raise ValueError(f"keys [B, C, Hkv, Dg] and weight [Hkv, 3D, Dg] must match recent (B={batch}, "
                         f"Hkv={hkv}); got keys {tuple(keys.shape)}, weight {tuple(weight.shape)}")
    chk.same_dtype("k_new", k_new, "recent", recent)
    chk.same_dtype("keys", keys, "recent", recent)
    for name, t in (("k_new", k_new), ("recent", recent), ("keys", keys)):
        chk.last_dim_contiguous(name, t)
    check_positions(positions, batch)
    chk.same_device({"k_new": k_new, "recent": recent, "keys": keys, "positions": positions, "weight": weight,
                     "norm_weight": norm_weight, "inv_freq": inv_freq})


@torch.library.custom_op("seerattn::gate_cache_append", mutates_args=("recent", "keys"))
def _gate_cache_append_op(
    k_new: torch.Tensor,
    recent: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = RMS_EPS,
) -> None:
    _check_append(k_new, recent, keys, positions, weight, norm_weight, inv_freq)
    if chk.debug_enabled() and positions.numel() and int(positions.min()) < 0:
        raise ValueError("positions must be >= 0 (SEERATTN_DEBUG check)")
    impl = backend.resolve("gate_cache_append", recent.device)
    impl(k_new, recent, keys, positions, weight, norm_weight, inv_freq, attention_scaling, eps)


@_gate_cache_append_op.register_fake
def _(k_new, recent, keys, positions, weight, norm_weight, inv_freq, attention_scaling=1.0, eps=RMS_EPS):
    _check_append(k_new, recent, keys, positions, weight, norm_weight, inv_freq)


def gate_cache_append(
    k_new: torch.Tensor,
    recent: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = RMS_EPS,
) -> None:
    """One decode step of a layer's compression cache, in place, with no host sync.

    Args:
        k_new: ``[B, Hkv, D]`` the current token's pre-RoPE key (dtype of ``recent``).
        recent: ``[B, block_size, Hkv, D]`` pre-RoPE keys of each row's current block;
            slot ``positions[b] % block_size`` is overwritten with ``k_new[b]``.
        keys: ``[B, C, Hkv, Dg]`` the compression cache (dtype of ``recent``); in rows
            whose token completes its block (``positions[b] % block_size == block_size - 1``)
            entry ``positions[b] // block_size`` becomes that block's entry (as
            :func:`gate_keys` computes it); a completed block at or past ``C`` is dropped,
            and nothing else is touched.
        positions: ``[B]`` int32/int64 the current token's position (from the row's first
            real token).
        weight, norm_weight, inv_freq, attention_scaling, eps: as in :func:`gate_keys`.

    Every step writes one key per row and KV head; only completing rows pool and project.
    """
    _check_append(k_new, recent, keys, positions, weight, norm_weight, inv_freq)
    _gate_cache_append_op(k_new, recent, keys, positions, weight, norm_weight, inv_freq, attention_scaling, eps)
