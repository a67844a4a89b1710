"""The gate's query branch at decode in one kernel: grouped projection, RMSNorm and RoPE.

Also home of the two device functions every gate projection shares (the compression-cache
kernels in :mod:`.gate_cache` call them too): :func:`project_chunk` and
:func:`norm_rope_store`. The projection is a GEMV per (row, KV head) with fp32 FMAs, not a
``tl.dot``: a decode step has one row per program, and a compressed key must come out bit
for bit the same whether the prompt's kernel or a decode step's kernel computes it, which
holds when both run this same code with the same tile shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, AotConfig, aot_config

# Elements of one [BLOCK_K, Dg / 2] weight tile (two of them, and two accumulators of that
# shape, live at once), and the warps that hold them. A program streams its KV head's
# whole weight (256 KiB for g 8, D 128, Dg 128 in fp16) with no software pipelining (no
# tl.dot), so each iteration should put as many bytes in flight as registers allow.
TILE_ELEMS = 8192
NUM_WARPS = 8


@triton.jit
def project_chunk(acc1, acc2, x, w_ptr, rows, row_mask, stride_wk, offs_n, n_mask, HALF):
    """``acc1 += x[:, None] * W[rows, :HALF]``, ``acc2 += x[:, None] * W[rows, HALF:]`` (fp32).

    x: ``[BLOCK_K]`` fp32 (zero where ``row_mask`` is off); acc1, acc2: ``[BLOCK_K,
    HALF_PAD]`` fp32 partial products, summed over rows once, in :func:`norm_rope_store`
    (a reduction across warps per chunk would cost a shared-memory round trip each). The
    output is kept as its two rotate-half halves so RoPE needs no register shuffle.
    """
    ptr = w_ptr + rows.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]
    mask = row_mask[:, None] & n_mask[None, :]
    w1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    w2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    return acc1 + x[:, None] * w1, acc2 + x[:, None] * w2


@triton.jit
def norm_rope_store(acc1, acc2, out_ptr, norm_ptr, inv_freq_ptr, pos, attention_scaling, eps, offs_n, n_mask,
                    HALF):
    """Sum the partial products of :func:`project_chunk`, RMSNorm over the ``2 * HALF``
    channels, rotate-half RoPE at position ``pos``, store.

    The angle is ``float32(pos) * inv_freq`` as in the torch path, so long positions round
    the same way; cos and sin are computed here instead of read from a table.
    """
    y1 = tl.sum(acc1, axis=0)
    y2 = tl.sum(acc2, axis=0)
    ss = tl.sum(y1 * y1, axis=0) + tl.sum(y2 * y2, axis=0)
    r = 1.0 / tl.sqrt(ss / (2 * HALF) + eps)
    a = y1 * r * tl.load(norm_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    b = y2 * r * tl.load(norm_ptr + HALF + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + offs_n, mask=n_mask, other=0.0)
    cos = tl.cos(angle) * attention_scaling
    sin = tl.sin(angle) * attention_scaling
    tl.store(out_ptr + offs_n, (a * cos - b * sin).to(out_ptr.dtype.element_ty), mask=n_mask)
    tl.store(out_ptr + HALF + offs_n, (b * cos + a * sin).to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gate_project_q_kernel(
    q_ptr, w_ptr, norm_ptr, inv_freq_ptr, pos_ptr, out_ptr, attention_scaling, eps,
    group, D, HALF,
    stride_qb, stride_qh, stride_wh, stride_wk, stride_ob, stride_oh,
    BLOCK_K: tl.constexpr, HALF_PAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, HALF_PAD)
    n_mask = offs_n < HALF
    # The group's g query heads are consecutive: together one input vector of g*D.
    q_row = q_ptr + pid_b.to(tl.int64) * stride_qb + (pid_h * group).to(tl.int64) * stride_qh
    w_head = w_ptr + pid_h.to(tl.int64) * stride_wh
    acc1 = tl.zeros([BLOCK_K, HALF_PAD], tl.float32)
    acc2 = tl.zeros([BLOCK_K, HALF_PAD], tl.float32)
    for k0 in range(0, group * D, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < group * D
        x = tl.load(q_row + (k // D) * stride_qh + k % D, mask=k_mask, other=0.0).to(tl.float32)
        acc1, acc2 = project_chunk(acc1, acc2, x, w_head, k, k_mask, stride_wk, offs_n, n_mask, HALF)
    pos = tl.load(pos_ptr + pid_b)
    out = out_ptr + pid_b.to(tl.int64) * stride_ob + pid_h * stride_oh
    norm_rope_store(acc1, acc2, out, norm_ptr, inv_freq_ptr, pos, attention_scaling, eps, offs_n, n_mask, HALF)


def tile_shape(dg: int, k_extent: int, tile_elems: int = TILE_ELEMS) -> tuple[int, int]:
    """``(BLOCK_K, HALF_PAD)``: weight tiles of at most ``tile_elems`` elements per half, no
    wider than the ``k_extent`` they stream over (both powers of 2, at least 16)."""
    half_pad = max(16, triton.next_power_of_2(dg // 2))
    block_k = max(16, min(triton.next_power_of_2(k_extent), tile_elems // half_pad))
    return block_k, half_pad


def gate_project_q(q_pre, weight, norm_weight, inv_freq, positions, attention_scaling, eps):
    """Launch one program per (row, KV head); inputs are validated.

    q_pre [B, Hq, D] (last dim contiguous), weight [Hkv, g, D, Dg] contiguous, norm_weight
    [Dg], inv_freq [Dg/2] fp32, positions [B] int32/int64. Returns [B, Hkv, Dg] in
    q_pre's dtype (fp32 math). Compiles once per dtype triple and padded tile shape; B, D, g
    and Dg are run-time values.
    """
    batch = q_pre.shape[0]
    hkv, group, d, dg = weight.shape
    out = torch.empty((batch, hkv, dg), dtype=q_pre.dtype, device=q_pre.device)
    if out.numel() == 0:
        return out
    block_k, half_pad = tile_shape(dg, group * d)
    _gate_project_q_kernel[(batch, hkv)](
        q_pre, weight, norm_weight, inv_freq, positions, out, attention_scaling, eps,
        group, d, dg // 2,
        q_pre.stride(0), q_pre.stride(1), weight.stride(0), weight.stride(2), out.stride(0), out.stride(1),
        BLOCK_K=block_k, HALF_PAD=half_pad, num_warps=NUM_WARPS,
    )
    return out


def aot_configs() -> list[AotConfig]:
    """AOT builds: fp16 and bf16 models with Dg 128 (published gates), fp32 with Dg 64."""
    ints = {a: "i32" for a in _gate_project_q_kernel.arg_names
            if a.startswith("stride_") or a in ("group", "D", "HALF")}
    configs = []
    for dtype, dg, g, d in ((torch.float16, 128, 8, 128), (torch.bfloat16, 128, 4, 128), (torch.float32, 64, 2, 64)):
        dt = "*" + TRITON_DTYPE[dtype]
        block_k, half_pad = tile_shape(dg, g * d)
        configs.append(aot_config(
            f"gate_project_q-{TRITON_DTYPE[dtype]}-Dg{dg}", _gate_project_q_kernel,
            dict(ints, q_ptr=dt, w_ptr=dt, norm_ptr=dt, inv_freq_ptr="*fp32", pos_ptr="*i64", out_ptr=dt,
                 attention_scaling="fp32", eps="fp32"),
            dict(BLOCK_K=block_k, HALF_PAD=half_pad), num_warps=NUM_WARPS))
    return configs
