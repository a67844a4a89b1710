"""The K compression cache in Triton: pool a block's pre-RoPE keys, project, norm, RoPE.

``gate_keys`` computes the entry of every block of a prompt (one program per row, block
and KV head); ``gate_cache_append`` is the decode step (one program per row and KV head):
it writes the new key into the recent buffer and, only in rows whose block it completes,
computes that block's entry. Both run :func:`_pool_project_store`, so an entry is bit for
bit the same whichever of them computed it (prefill of N+M tokens == prefill of N, then M
decode steps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, AotConfig, aot_config
from .gate_project_q import norm_rope_store

# Elements of one [tokens, BLOCK_K] tile of keys (a 64-token block in one load), and of
# one [BLOCK_K, Dg / 2] weight tile (a whole D = 128 chunk at Dg 128: each program makes one
# pass, its six weight tiles in flight at once; 104-111 registers on sm_90, no spill).
TOKEN_TILE_ELEMS = 8192
WEIGHT_TILE_ELEMS = 8192
NUM_WARPS = 8


@triton.jit
def _project_chunk(acc1, acc2, x, w_ptr, rows, row_mask, stride_wk, offs_n, n_mask, HALF):
    """``acc1 += x[:, None] * W[rows, :HALF]``, ``acc2 += x[:, None] * W[rows, HALF:]`` (fp32).

    x: ``[BLOCK_K]`` fp32 (zero where ``row_mask`` is off); acc1, acc2: ``[BLOCK_K,
    HALF_PAD]`` fp32 partial products, summed over rows once at the end (a reduction across
    warps per chunk would cost a shared-memory round trip each). A GEMV in fp32 FMAs, not a
    ``tl.dot``: one row per program, and the same code in both kernels keeps their entries
    bit-identical.
    """
    ptr = w_ptr + rows.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    w1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    return acc1 + x[:, None] * w1, acc2 + x[:, None] * w2


@triton.jit
def _pool_project_store(
    src, stride_t, n_valid, repl_slot, repl, w_head, stride_wk, norm_ptr, inv_freq_ptr, pos,
    attention_scaling, eps, out, D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, HALF_PAD: tl.constexpr,
):
    """Entry of one block of one KV head: ``[max | min | mean]`` of its first ``n_valid``
    tokens (token ``t`` at ``src + t * stride_t``; token ``repl_slot``, if >= 0, read from
    ``repl`` instead), rounded to the keys' dtype as ``kpool`` returns it, times W, RMSNorm,
    RoPE at ``pos``, stored at ``out``. No valid token: the pooled vector is zeros.

    The pooling streams over D in chunks of BLOCK_K and feeds each chunk of the three
    pooled parts straight into the projection, so no pooled vector is stored.
    """
    offs_k = tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, HALF_PAD)
    n_mask = offs_n < HALF
    count = tl.minimum(tl.maximum(n_valid, 0), BLOCK_SIZE)
    nonempty = count > 0
    acc1 = tl.zeros([BLOCK_K, HALF_PAD], tl.float32)
    acc2 = tl.zeros([BLOCK_K, HALF_PAD], tl.float32)
    for d0 in range(0, D, BLOCK_K):
        d = d0 + offs_k
        d_mask = d < D
        new = tl.load(repl + d, mask=d_mask & (d * 0 + repl_slot >= 0), other=0.0)
        new = new.to(src.dtype.element_ty).to(tl.float32)
        vmax = tl.full([BLOCK_K], float("-inf"), tl.float32)
        vmin = tl.full([BLOCK_K], float("inf"), tl.float32)
        vsum = tl.zeros([BLOCK_K], tl.float32)
        for t0 in range(0, BLOCK_SIZE, BLOCK_T):
            t = t0 + offs_t
            valid = t < count
            x = tl.load(src + t.to(tl.int64)[:, None] * stride_t + d[None, :],
                        mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
            x = tl.where((t == repl_slot)[:, None], new[None, :], x)
            vmax = tl.maximum(vmax, tl.max(tl.where(valid[:, None], x, float("-inf")), axis=0))
            vmin = tl.minimum(vmin, tl.min(tl.where(valid[:, None], x, float("inf")), axis=0))
            vsum += tl.sum(x, axis=0)
        dtype = src.dtype.element_ty
        vmax = tl.where(nonempty & d_mask, vmax, 0.0).to(dtype).to(tl.float32)
        vmin = tl.where(nonempty & d_mask, vmin, 0.0).to(dtype).to(tl.float32)
        mean = (vsum / tl.maximum(count, 1).to(tl.float32)).to(dtype).to(tl.float32)
        acc1, acc2 = _project_chunk(acc1, acc2, vmax, w_head, d, d_mask, stride_wk, offs_n, n_mask, HALF)
        acc1, acc2 = _project_chunk(acc1, acc2, vmin, w_head, D + d, d_mask, stride_wk, offs_n, n_mask, HALF)
        acc1, acc2 = _project_chunk(acc1, acc2, mean, w_head, 2 * D + d, d_mask, stride_wk, offs_n, n_mask, HALF)
    norm_rope_store(tl.sum(acc1, axis=0)[None, :], tl.sum(acc2, axis=0)[None, :], (out + offs_n)[None, :],
                    n_mask[None, :], norm_ptr, inv_freq_ptr, tl.zeros([1], tl.int64) + pos, attention_scaling, eps,
                    offs_n, n_mask, HALF)


@triton.jit
def _gate_keys_kernel(
    k_ptr, seqlens_ptr, offsets_ptr, w_ptr, norm_ptr, inv_freq_ptr, out_ptr, attention_scaling, eps,
    stride_kb, stride_ks, stride_kh, stride_wh, stride_wk, stride_ob, stride_on, stride_oh,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, HALF_PAD: tl.constexpr, HAS_OFFSETS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    seqlen = tl.load(seqlens_ptr + pid_b)
    if HAS_OFFSETS:
        start = tl.load(offsets_ptr + pid_b)
    else:
        start = 0
    tok0 = pid_n * BLOCK_SIZE
    src = (k_ptr + pid_b.to(tl.int64) * stride_kb + (start + tok0).to(tl.int64) * stride_ks
           + pid_h.to(tl.int64) * stride_kh)
    out = out_ptr + pid_b.to(tl.int64) * stride_ob + pid_n.to(tl.int64) * stride_on + pid_h * stride_oh
    _pool_project_store(src, stride_ks, seqlen - tok0, -1, src, w_ptr + pid_h.to(tl.int64) * stride_wh, stride_wk,
                        norm_ptr, inv_freq_ptr, tok0, attention_scaling, eps, out, D, HALF,
                        BLOCK_SIZE, BLOCK_T, BLOCK_K, HALF_PAD)


@triton.jit
def _gate_cache_append_kernel(
    new_ptr, recent_ptr, keys_ptr, pos_ptr, w_ptr, norm_ptr, inv_freq_ptr, attention_scaling, eps,
    capacity,
    stride_nb, stride_nh, stride_rb, stride_rt, stride_rh, stride_kb, stride_kn, stride_kh, stride_wh, stride_wk,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, HALF_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pos = tl.load(pos_ptr + pid_b)
    slot = pos % BLOCK_SIZE
    last = pos // BLOCK_SIZE
    new = new_ptr + pid_b.to(tl.int64) * stride_nb + pid_h * stride_nh
    recent = recent_ptr + pid_b.to(tl.int64) * stride_rb + pid_h * stride_rh
    offs_d = tl.arange(0, D_PAD)
    x = tl.load(new + offs_d, mask=offs_d < D, other=0.0)
    tl.store(recent + slot * stride_rt + offs_d, x.to(recent_ptr.dtype.element_ty), mask=offs_d < D)
    # Only a completing row does more. Its pooling takes the new key from k_new, not from
    # the slot this program just wrote, so no barrier has to order the store and the load.
    if (slot == BLOCK_SIZE - 1) & (last < capacity):
        out = keys_ptr + pid_b.to(tl.int64) * stride_kb + last * stride_kn + pid_h * stride_kh
        _pool_project_store(recent, stride_rt, BLOCK_SIZE, slot, new, w_ptr + pid_h.to(tl.int64) * stride_wh,
                            stride_wk, norm_ptr, inv_freq_ptr, last * BLOCK_SIZE, attention_scaling, eps, out,
                            D, HALF, BLOCK_SIZE, BLOCK_T, BLOCK_K, HALF_PAD)


def _tiles(block_size: int, d: int, dg: int) -> dict:
    """Constexprs shared by both kernels (the same tiles give the same rounding)."""
    half_pad = max(16, triton.next_power_of_2(dg // 2))
    block_k = max(16, min(triton.next_power_of_2(d), WEIGHT_TILE_ELEMS // half_pad))
    return dict(D=d, HALF=dg // 2, BLOCK_SIZE=block_size, BLOCK_T=max(1, min(block_size, TOKEN_TILE_ELEMS // block_k)),
                BLOCK_K=block_k, HALF_PAD=half_pad)


def gate_keys(k, cache_seqlens, block_size, weight, norm_weight, inv_freq, attention_scaling, eps, cache_offsets):
    """Entries of every block; inputs are validated.

    k [B, S, Hkv, D] (last dim contiguous), cache_seqlens / cache_offsets [B] int32 (offsets
    may be None), weight [Hkv, 3D, Dg] contiguous, norm_weight [Dg], inv_freq [Dg/2] fp32.
    Returns [B, ceil(S/bs), Hkv, Dg] in k's dtype; block j RoPE'd at j * block_size.
    Compiles once per dtype pair, block size, D and Dg.
    """
    batch, s, hkv, d = k.shape
    dg = weight.shape[-1]
    nblk = triton.cdiv(s, block_size)
    out = torch.empty((batch, nblk, hkv, dg), dtype=k.dtype, device=k.device)
    if out.numel() == 0:
        return out
    offsets = cache_offsets if cache_offsets is not None else cache_seqlens
    _gate_keys_kernel[(nblk, hkv, batch)](
        k, cache_seqlens, offsets, weight, norm_weight, inv_freq, out, attention_scaling, eps,
        k.stride(0), k.stride(1), k.stride(2), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HAS_OFFSETS=cache_offsets is not None, num_warps=NUM_WARPS, **_tiles(block_size, d, dg),
    )
    return out


def gate_cache_append(k_new, recent, keys, positions, weight, norm_weight, inv_freq, attention_scaling, eps):
    """One decode step of the cache, in place; inputs are validated.

    k_new [B, Hkv, D], recent [B, bs, Hkv, D], keys [B, C, Hkv, Dg] (last dims contiguous),
    positions [B] int32/int64. Writes ``recent[b, pos % bs] = k_new[b]``; where
    ``pos % bs == bs - 1`` (and ``pos // bs < C``) also ``keys[b, pos // bs]``, the entry
    of the completed block. One launch of B x Hkv programs, no host sync.
    """
    batch, block_size, hkv, d = recent.shape
    dg = weight.shape[-1]
    if batch == 0:
        return
    _gate_cache_append_kernel[(batch, hkv)](
        k_new, recent, keys, positions, weight, norm_weight, inv_freq, attention_scaling, eps,
        keys.shape[1],
        k_new.stride(0), k_new.stride(1), recent.stride(0), recent.stride(1), recent.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), weight.stride(0), weight.stride(1),
        D_PAD=triton.next_power_of_2(d), num_warps=NUM_WARPS, **_tiles(block_size, d, dg),
    )


def aot_configs() -> list[AotConfig]:
    """AOT builds: fp16 and bf16 with the published shape (D 128, Dg 128, block 64), fp32
    with D 64, Dg 64 and the largest and smallest blocks."""
    configs = []
    for dtype, d, dg, bs in ((torch.float16, 128, 128, 64), (torch.bfloat16, 128, 128, 64),
                             (torch.float32, 64, 64, 128), (torch.float32, 64, 64, 16)):
        dt = "*" + TRITON_DTYPE[dtype]
        tiles = _tiles(bs, d, dg)
        scalars = dict(w_ptr=dt, norm_ptr=dt, inv_freq_ptr="*fp32", attention_scaling="fp32", eps="fp32")
        tag = f"{TRITON_DTYPE[dtype]}-D{d}-Dg{dg}-bs{bs}"
        for name, fn, types, constexprs in (
            ("gate_keys", _gate_keys_kernel, dict(k_ptr=dt, seqlens_ptr="*i32", offsets_ptr="*i32", out_ptr=dt),
             dict(tiles, HAS_OFFSETS=dtype != torch.bfloat16)),
            ("gate_cache_append", _gate_cache_append_kernel,
             dict(new_ptr=dt, recent_ptr=dt, keys_ptr=dt, pos_ptr="*i64", capacity="i32"),
             dict(tiles, D_PAD=triton.next_power_of_2(d))),
        ):
            ints = {a: "i32" for a in fn.arg_names if a.startswith("stride_")}
            configs.append(aot_config(f"{name}-{tag}", fn, dict(ints, **scalars, **types),
                                      constexprs, num_warps=NUM_WARPS))
    return configs
