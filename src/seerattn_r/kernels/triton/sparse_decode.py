"""Block-sparse split-K flash decoding in Triton (NVIDIA and AMD).

One program per (batch row, selection head, split) attends the whole query group of its KV
head to the split's share of the selected KV blocks, so each K/V block is read once per
group; a second kernel merges the splits' partial (out, lse) by log-sum-exp. When one split
suffices the first kernel writes the final output and the merge is skipped.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, AotConfig, aot_config, compute_units, dot, interpreting, is_hip

# The plan aims at this many programs per SM/CU (rounded up to whole splits). Programs of
# equal work that all fit in one wave finish together; a partial second wave leaves a tail
# with little memory traffic in flight. One per unit (under two after rounding) is one wave
# at the two or more programs per SM/CU the tiles below allow, and one program with its
# K/V tiles in flight already keeps an SM's share of HBM busy. Measured on H100 (B=16,
# Hkv=8, so 128 programs per split, 3 resident per SM): 1-3 splits reach 93-100% of the
# bandwidth floor, 4-5 splits (1.3-1.6 waves) 85-90%.
PROGRAMS_PER_UNIT = 1
# A split below this many slots costs more in partial writes and merging than it saves.
MIN_SLOTS_PER_SPLIT = 4
# Bytes of one K (or V) tile: 16 KiB keeps num_stages tiles of K and V in flight per program
# with room for two or three programs per SM/CU.
TILE_BYTES = 16384


@triton.jit(do_not_specialize=["num_slots"])
def _sparse_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, seqlens_ptr, offsets_ptr, idx_ptr, out_ptr, lse_ptr,
    qk_scale, group, rows, num_slots,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ib, stride_ih,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    ROWS_PAD: tl.constexpr, SLOTS_PAD: tl.constexpr, HAS_OFFSETS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seqlen = tl.load(seqlens_ptr + pid_b)
    if HAS_OFFSETS:
        start = tl.load(offsets_ptr + pid_b)
    else:
        start = 0
    num_blocks = tl.cdiv(seqlen, BLOCK_SIZE)

    # Selection head pid_h serves query heads q_head0 .. q_head0 + rows - 1 (its whole GQA
    # group for [B, Hkv, M] indices, one head for [B, Hq, M]); rows are padded to the
    # tensor-core minimum and the padding rows are never stored.
    q_head0 = pid_h * rows
    kv_head = q_head0 // group
    offs_r = tl.arange(0, ROWS_PAD)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    offs_n = tl.arange(0, BLOCK_N)
    row_mask = offs_r < rows
    q = tl.load(q_ptr + pid_b * stride_qb + (q_head0 + offs_r)[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None], other=0.0)

    # The index row stays in registers for the duplicate test below.
    idx_row = idx_ptr + pid_b * stride_ib + pid_h * stride_ih
    offs_m = tl.arange(0, SLOTS_PAD)
    ids = tl.load(idx_row + offs_m, mask=offs_m < num_slots, other=-1)
    in_range = (ids >= 0) & (ids < num_blocks)
    # Slots are dealt round-robin over the splits: selection packs its ids in front of the
    # -1 padding, so this spreads them evenly; past the last in-range slot nothing is left.
    end = tl.max(tl.where(in_range, offs_m, -1)) + 1
    SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N
    num_iters = tl.cdiv(end - pid_s, num_splits) * SUB

    k_base = k_ptr + pid_b.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + pid_b.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh

    m_i = tl.full([ROWS_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS_PAD], tl.float32)
    acc = tl.zeros([ROWS_PAD, DV], tl.float32)
    for it in range(0, num_iters):
        slot = pid_s + (it // SUB) * num_splits
        blk = tl.load(idx_row + slot)
        # A block listed at an earlier slot of the row was (or will be) counted there.
        dup = tl.sum(((ids == blk) & (offs_m < slot)).to(tl.int32), axis=0)
        use = (blk >= 0) & (blk < num_blocks) & (dup == 0)
        # A skipped slot reads from token 0 with no valid token: one vector compare masks
        # both the skip and the tokens past the row's end.
        tok0 = tl.where(use, blk, 0) * BLOCK_SIZE + (it % SUB) * BLOCK_N
        tok_mask = tok0 + offs_n < tl.where(use, seqlen, 0)
        # 64-bit row offset: token * stride overflows int32 on long caches with many heads.
        row_off = (start + tok0).to(tl.int64)
        k = tl.load(k_base + row_off * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :],
                    mask=tok_mask[:, None], other=0.0)
        qk = dot(q, tl.trans(k), INTERPRET) * qk_scale
        qk = tl.where(tok_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        # Rows that have seen no token yet keep m = -inf; shifting by 0 keeps exp2 NaN-free.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(qk - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + row_off * stride_vs + offs_n[:, None] * stride_vs + offs_dv[None, :],
                    mask=tok_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, INTERPRET)
        m_i = m_new

    has_tokens = l_i > 0.0
    out = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    lse = tl.where(has_tokens, (m_i + tl.log2(tl.where(has_tokens, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    heads = q_head0 + offs_r
    tl.store(out_ptr + pid_b * stride_ob + heads[:, None] * stride_oh + pid_s * stride_os + offs_dv[None, :],
             out, mask=row_mask[:, None])
    tl.store(lse_ptr + pid_b * stride_lb + heads * stride_lh + pid_s * stride_ls, lse, mask=row_mask)


@triton.jit
def _sparse_decode_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_plb, stride_plh,
    stride_ob, stride_oh,
    stride_lb, stride_lh,
    DV: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_dv = tl.arange(0, DV)
    split_mask = offs_s < num_splits
    lse = tl.load(part_lse_ptr + pid_b * stride_plb + pid_h * stride_plh + offs_s, mask=split_mask,
                  other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_shift = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_shift)
    w_sum = tl.sum(w, axis=0)
    part = tl.load(part_out_ptr + pid_b * stride_pb + pid_h * stride_ph + offs_s[:, None] * stride_ps
                   + offs_dv[None, :], mask=split_mask[:, None], other=0.0)
    has_tokens = w_sum > 0.0
    w_sum = tl.where(has_tokens, w_sum, 1.0)
    out = tl.sum(part * w[:, None], axis=0) / w_sum
    tl.store(out_ptr + pid_b * stride_ob + pid_h * stride_oh + offs_dv, out)
    tl.store(lse_ptr + pid_b * stride_lb + pid_h * stride_lh,
             tl.where(has_tokens, m + tl.log(w_sum), float("-inf")))


def plan_splits(device: torch.device, work: int, num_slots: int) -> int:
    """Number of splits of the selected blocks of each (row, selection head).

    ``work`` is B * selection heads (programs per split), ``num_slots`` the index row length
    M. Aims at PROGRAMS_PER_UNIT programs per SM/CU with at least MIN_SLOTS_PER_SPLIT slots
    per split. Depends on shapes and the device only: no host sync, the same for every layer
    of a decode step, and a captured CUDA graph stays valid.
    """
    wanted = triton.cdiv(PROGRAMS_PER_UNIT * compute_units(device), max(work, 1))
    return max(1, min(wanted, num_slots // MIN_SLOTS_PER_SPLIT))


def _tile(dtype: torch.dtype, d: int, dv: int, block_size: int) -> int:
    """Tokens per K/V tile: the whole block when it fits TILE_BYTES, else a power-of-2 part."""
    fits = TILE_BYTES // (max(d, dv) * dtype.itemsize)
    return min(block_size, max(16, fits))


def _rows_pad(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))


def _warps(block_n: int, d: int) -> int:
    return 8 if block_n * d >= 16384 else 4


def _stages(hip: bool) -> int:
    # Two K/V tiles in flight beside the one in use on NVIDIA; AMD's 64 KiB of LDS holds
    # one in flight.
    return 2 if hip else 3


def sparse_decode(q, k_cache, v_cache, cache_seqlens, block_indices, block_size, sm_scale, cache_offsets):
    """Launch the split (and, with several splits, combine) kernels; inputs are validated.

    q [B, Hq, D]; k_cache [B, Smax, Hkv, D], v_cache [B, Smax, Hkv, Dv] (last dim contiguous,
    any other strides); cache_seqlens [B] int32; block_indices [B, Hkv or Hq, M] int32
    (-1 padding, any order, duplicates counted once); cache_offsets [B] int32 or None.
    Returns out [B, Hq, Dv] in q.dtype and lse [B, Hq] fp32 (natural log, -inf and out 0 for
    a head with no valid token). Compiles once per dtype, D, Dv, block_size, group padding,
    next power of 2 of M and offsets/no offsets; lengths and batch do not recompile.
    """
    batch, hq, d = q.shape
    hkv, dv = k_cache.shape[2], v_cache.shape[3]
    sel_heads, num_slots = block_indices.shape[1], block_indices.shape[2]
    group = hq // hkv
    rows = group if sel_heads == hkv else 1
    block_n = _tile(q.dtype, d, dv, block_size)
    num_splits = plan_splits(q.device, batch * sel_heads, num_slots)

    out = torch.empty((batch, hq, dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, hq), dtype=torch.float32, device=q.device)
    if num_splits == 1:
        part_out, part_lse = out.unsqueeze(2), lse.unsqueeze(2)
    else:
        part_out = torch.empty((batch, hq, num_splits, dv), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, hq, num_splits), dtype=torch.float32, device=q.device)
    offsets = cache_offsets if cache_offsets is not None else cache_seqlens
    _sparse_decode_split_kernel[(batch, sel_heads, num_splits)](
        q, k_cache, v_cache, cache_seqlens, offsets, block_indices, part_out, part_lse,
        sm_scale * math.log2(math.e), group, rows, num_slots,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_indices.stride(0), block_indices.stride(1),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1), part_lse.stride(2),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, D=d, DV=dv, ROWS_PAD=_rows_pad(rows),
        SLOTS_PAD=max(1, triton.next_power_of_2(num_slots)), HAS_OFFSETS=cache_offsets is not None,
        INTERPRET=interpreting(), num_warps=_warps(block_n, max(d, dv)), num_stages=_stages(is_hip()),
    )
    if num_splits > 1:
        _sparse_decode_combine_kernel[(batch, hq)](
            part_out, part_lse, out, lse, num_splits,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            DV=dv, SPLITS_PAD=triton.next_power_of_2(num_splits), num_warps=4,
        )
    return out, lse


def aot_configs() -> list[AotConfig]:
    """The builds ``tests/test_triton_aot.py`` compiles for NVIDIA and AMD: each dtype and
    head dim, both output kinds (final and partial), offsets, per-query-head indices and a
    group past 16, the smallest block and blocks split into tiles."""
    split = _sparse_decode_split_kernel
    ints = {a: "i32" for a in split.arg_names if a.startswith("stride_") or a in ("group", "rows", "num_slots")}
    cases = [  # dtype, D = Dv, block_size, rows per program, offsets, partial (split) outputs
        (torch.float16, 64, 64, 8, False, False),
        (torch.float16, 128, 64, 8, True, True),
        (torch.float16, 256, 32, 4, False, True),
        (torch.bfloat16, 128, 128, 32, True, False),
        (torch.float16, 128, 16, 1, False, True),
        (torch.float32, 128, 64, 8, False, True),
    ]
    configs = []
    for dtype, d, bs, rows, offsets, partial in cases:
        dt = "*" + TRITON_DTYPE[dtype]
        block_n = _tile(dtype, d, d, bs)
        types = dict(ints, q_ptr=dt, k_ptr=dt, v_ptr=dt, seqlens_ptr="*i32", offsets_ptr="*i32",
                     idx_ptr="*i32", out_ptr="*fp32" if partial else dt, lse_ptr="*fp32", qk_scale="fp32")
        constexprs = dict(BLOCK_SIZE=bs, BLOCK_N=block_n, D=d, DV=d, ROWS_PAD=_rows_pad(rows), SLOTS_PAD=128,
                          HAS_OFFSETS=offsets, INTERPRET=False)
        configs.append(aot_config(
            f"sparse_decode_split-{TRITON_DTYPE[dtype]}-D{d}-bs{bs}-rows{rows}-off{int(offsets)}-part{int(partial)}",
            split, types, constexprs, matrix_cores=dtype != torch.float32,
            hip_options=dict(num_stages=_stages(True)), num_warps=_warps(block_n, d), num_stages=_stages(False)))
    combine = _sparse_decode_combine_kernel
    ints = {a: "i32" for a in combine.arg_names if a.startswith("stride_") or a == "num_splits"}
    for dtype, dv in ((torch.bfloat16, 128), (torch.float32, 256)):
        dt = "*" + TRITON_DTYPE[dtype]
        types = dict(ints, part_out_ptr="*fp32", part_lse_ptr="*fp32", out_ptr=dt, lse_ptr="*fp32")
        configs.append(aot_config(f"sparse_decode_combine-{TRITON_DTYPE[dtype]}-Dv{dv}", combine, types,
                                  dict(DV=dv, SPLITS_PAD=16), num_warps=4))
    return configs
