"""Gate block probabilities, ``softmax(q . k * sm_scale)`` over the scored blocks, in Triton.

Two kernels. ``_gate_logits_kernel`` runs one program per (row, KV head, chunk of blocks):
it reads its chunk of the K compression cache once, writes the chunk's logits (log2 units,
fp32) into the output and the chunk's softmax partial (max, sum of exp2) into a small
workspace. ``_gate_normalize_kernel`` (same grid) combines the row's partials and turns
its chunk's logits into probabilities in place. The chunk count comes from the SM/CU
count and the shapes only (:func:`plan_chunks`), so a batch-1 step still spreads over the
whole GPU and a captured CUDA graph stays valid.

The row combine (:func:`row_stats`) sums the partials in fixed point, so its result does
not depend on the reduction order (and hence not on a kernel's layout or warp count):
:mod:`.select_blocks` recomputes the very same probabilities from the logits when it
selects straight from them (:mod:`.gate_select`), bit for bit.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, AotConfig, aot_config, compute_units

# Elements of one [blocks, Dg] tile of k_gate held in registers at a time: 8 KiB of fp16,
# 64 B (four 16-byte loads) per thread at 4 warps.
TILE_ELEMS = 4096
# Programs aimed at per SM/CU. Nothing is pipelined inside a program (its loop has no dot),
# so the loads in flight per SM are one tile per resident program: 8 of them (a quarter of
# an H100 SM's warps) keep ~64 KiB in flight per SM, above the share of HBM's
# bandwidth-latency product an SM needs, in a single wave.
PROGRAMS_PER_UNIT = 8
# Partials combined per step of row_stats's loop (a plan rarely makes more chunks).
PART_TILE = 64


@triton.jit
def row_stats(part_row, stride_pc, chunks, PART_TILE: tl.constexpr):
    """Softmax max and normaliser (log2 units) of one row from its chunks' partials.

    ``part_row`` points at ``[chunks, 2]`` fp32 (max, sum of exp2 below it); returns
    (m, total), (-inf, 0) for a row with nothing scored. The sum is taken in fixed point:
    integer addition is associative, so every kernel calling this gets the same bits.
    Units of 2**-32: a chunk weighs at most its block count (all chunks < 2**31 blocks), so
    the sum stays below 2**63, and truncating each weight (< 2**-32) is far below the fp32
    rounding of a total that is at least 1 (the max chunk weighs >= 1).
    """
    offs = tl.arange(0, PART_TILE)
    m = tl.max(tl.full([PART_TILE], float("-inf"), tl.float32), axis=0)
    for c0 in range(0, chunks, PART_TILE):
        c = c0 + offs
        m = tl.maximum(m, tl.max(tl.load(part_row + c * stride_pc, mask=c < chunks, other=float("-inf")), axis=0))
    acc = tl.sum(tl.zeros([PART_TILE], tl.int64), axis=0)
    for c0 in range(0, chunks, PART_TILE):
        c = c0 + offs
        m_c = tl.load(part_row + c * stride_pc, mask=c < chunks, other=float("-inf"))
        s_c = tl.load(part_row + c * stride_pc + 1, mask=c < chunks, other=0.0)
        # An empty chunk (m_c = -inf) weighs nothing; also keeps -inf - -inf out.
        weight = tl.where(m_c > float("-inf"), s_c * tl.exp2(m_c - m), 0.0)
        acc += tl.sum((weight * 4294967296.0).to(tl.int64), axis=0)
    return m, acc.to(tl.float32) * (1.0 / 4294967296.0)


@triton.jit
def probs(logits, m, total):
    """Probabilities from log2-unit logits and their row's (m, total): the one formula both
    the normalize kernel and the fused selection use, so they agree bit for bit."""
    return tl.exp2(logits - m) / total


@triton.jit(do_not_specialize=["nblk", "chunk_blocks"])
def _gate_logits_kernel(
    q_ptr, k_ptr, num_blocks_ptr, logits_ptr, part_ptr, qk_scale, nblk, chunk_blocks,
    stride_qb, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_lb, stride_lh,
    stride_pb, stride_ph,
    BLOCK_J: tl.constexpr, DG: tl.constexpr, DG_PAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_c = tl.program_id(2)
    scored = tl.minimum(tl.load(num_blocks_ptr + pid_b), nblk)
    offs_g = tl.arange(0, DG_PAD)
    g_mask = offs_g < DG
    q = tl.load(q_ptr + pid_b * stride_qb + pid_h * stride_qh + offs_g, mask=g_mask, other=0.0).to(tl.float32)
    k_row = k_ptr + pid_b.to(tl.int64) * stride_kb + pid_h * stride_kh
    l_row = logits_ptr + pid_b.to(tl.int64) * stride_lb + pid_h * stride_lh
    offs = tl.arange(0, BLOCK_J)

    # Only scored blocks are read: an unscored tail (the current block, a short row)
    # costs no bandwidth, and a chunk past `scored` loops zero times.
    start = pid_c * chunk_blocks
    stop = tl.minimum(start + chunk_blocks, scored)
    # Online softmax per tile slot, reduced across the tile once at the end: no cross-warp
    # reduction inside the loop.
    m_slot = tl.full([BLOCK_J], float("-inf"), tl.float32)
    s_slot = tl.zeros([BLOCK_J], tl.float32)
    for j0 in range(start, stop, BLOCK_J):
        j = j0 + offs
        j_mask = j < stop
        if DG == DG_PAD:
            # No mask along Dg: a mask the compiler cannot prove constant there would
            # split the row into scalar loads instead of 16-byte ones.
            kv_mask = j_mask[:, None]
        else:
            kv_mask = j_mask[:, None] & g_mask[None, :]
        k = tl.load(k_row + j.to(tl.int64)[:, None] * stride_kn + offs_g[None, :], mask=kv_mask,
                    other=0.0).to(tl.float32)
        logits = tl.where(j_mask, tl.sum(k * q[None, :], axis=1) * qk_scale, float("-inf"))
        tl.store(l_row + j, logits, mask=j_mask)
        m_new = tl.maximum(m_slot, logits)
        # A slot with nothing seen yet stays (-inf, 0) without computing -inf - -inf.
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_slot = s_slot * tl.exp2(m_slot - base) + tl.exp2(logits - base)
        m_slot = m_new
    m = tl.max(m_slot, axis=0)
    total = tl.sum(s_slot * tl.exp2(m_slot - tl.where(m == float("-inf"), 0.0, m)), axis=0)
    part = part_ptr + pid_b.to(tl.int64) * stride_pb + pid_h * stride_ph + pid_c * 2
    tl.store(part, m)
    tl.store(part + 1, total)


@triton.jit(do_not_specialize=["nblk", "chunks", "chunk_blocks"])
def _gate_normalize_kernel(
    out_ptr, part_ptr, num_blocks_ptr, nblk, chunks, chunk_blocks,
    stride_ob, stride_oh, stride_pb, stride_ph,
    BLOCK_J: tl.constexpr, PART_TILE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_c = tl.program_id(2)
    scored = tl.minimum(tl.load(num_blocks_ptr + pid_b), nblk)
    m, total = row_stats(part_ptr + pid_b.to(tl.int64) * stride_pb + pid_h * stride_ph, 2, chunks, PART_TILE)
    out_row = out_ptr + pid_b.to(tl.int64) * stride_ob + pid_h * stride_oh
    offs = tl.arange(0, BLOCK_J)
    start = pid_c * chunk_blocks
    stop = tl.minimum(start + chunk_blocks, nblk)
    for j0 in range(start, stop, BLOCK_J):
        j = j0 + offs
        # The logits kernel wrote only scored blocks; the rest of the chunk becomes 0.
        logits = tl.load(out_row + j, mask=j < scored, other=float("-inf"))
        tl.store(out_row + j, tl.where(j < scored, probs(logits, m, total), 0.0), mask=j < stop)


def blocks_per_tile(dg: int) -> int:
    """Blocks of one k_gate tile (BLOCK_J) for gate dim ``dg``."""
    return max(1, min(TILE_ELEMS // triton.next_power_of_2(dg), 64))


def plan_chunks(device: torch.device, rows: int, nblk: int, block_j: int) -> tuple[int, int]:
    """(chunks per row, blocks per chunk) for ``rows`` = B * Hkv rows of ``nblk`` blocks.

    Aims at PROGRAMS_PER_UNIT programs per SM/CU, with whole tiles of ``block_j`` blocks per
    chunk. Depends on shapes and the device only: no host sync, and the same for every
    layer of a decode step.
    """
    tiles = max(1, triton.cdiv(nblk, block_j))
    wanted = triton.cdiv(PROGRAMS_PER_UNIT * compute_units(device), max(rows, 1))
    chunk_blocks = triton.cdiv(tiles, max(1, min(wanted, tiles))) * block_j
    return max(1, triton.cdiv(nblk, chunk_blocks)), chunk_blocks


def gate_logits(q_gate, k_gate, num_blocks, sm_scale, chunks=None):
    """Launch the logits kernel; inputs are validated.

    q_gate [B, Hkv, Dg], k_gate [B, Nblk, Hkv, Dg] (fp16/bf16/fp32, last dim contiguous),
    num_blocks [B] int32. Returns (logits [B, Hkv, Nblk] fp32, log2 units, written only at
    j < num_blocks[b]; partials [B, Hkv, chunks, 2] fp32 (max, sum of exp2) per chunk;
    blocks per chunk). ``chunks`` overrides the plan (tests). Compiles once per dtype pair
    and Dg; Nblk, batch and the plan do not recompile.
    """
    batch, hkv, dg = q_gate.shape
    nblk = k_gate.shape[1]
    block_j = blocks_per_tile(dg)
    if chunks is None:
        chunks, chunk_blocks = plan_chunks(q_gate.device, batch * hkv, nblk, block_j)
    else:
        chunk_blocks = triton.cdiv(triton.cdiv(max(nblk, 1), chunks), block_j) * block_j
    logits = torch.empty((batch, hkv, nblk), dtype=torch.float32, device=q_gate.device)
    part = torch.empty((batch, hkv, chunks, 2), dtype=torch.float32, device=q_gate.device)
    if batch * hkv == 0:
        return logits, part, chunk_blocks
    _gate_logits_kernel[(batch, hkv, chunks)](
        q_gate, k_gate, num_blocks, logits, part, sm_scale * math.log2(math.e), nblk, chunk_blocks,
        q_gate.stride(0), q_gate.stride(1),
        k_gate.stride(0), k_gate.stride(1), k_gate.stride(2),
        logits.stride(0), logits.stride(1),
        part.stride(0), part.stride(1),
        BLOCK_J=block_j, DG=dg, DG_PAD=triton.next_power_of_2(dg), num_warps=4,
    )
    return logits, part, chunk_blocks


def gate_scores(q_gate, k_gate, num_blocks, sm_scale, chunks=None):
    """Launch the logits and normalize kernels; inputs are validated.

    q_gate [B, Hkv, Dg], k_gate [B, Nblk, Hkv, Dg] (fp16/bf16/fp32, last dim contiguous),
    num_blocks [B] int32. Returns [B, Hkv, Nblk] fp32: softmax over blocks
    j < num_blocks[b], exactly 0 elsewhere. ``chunks`` overrides the plan (tests).
    Compiles once per dtype pair and Dg; Nblk and batch do not recompile.
    """
    out, part, chunk_blocks = gate_logits(q_gate, k_gate, num_blocks, sm_scale, chunks)
    batch, hkv, nblk = out.shape
    if out.numel() == 0:
        return out
    _gate_normalize_kernel[(batch, hkv, part.shape[2])](
        out, part, num_blocks, nblk, part.shape[2], chunk_blocks,
        out.stride(0), out.stride(1), part.stride(0), part.stride(1),
        BLOCK_J=blocks_per_tile(q_gate.shape[-1]), PART_TILE=PART_TILE, num_warps=4,
    )
    return out


def aot_configs() -> list[AotConfig]:
    """AOT builds: bf16 and fp16 gates with Dg 128 (the published ones), fp32 with Dg 64,
    a Dg that is not a power of 2; the normalize kernel for both tile sizes."""
    ints = {a: "i32" for a in _gate_logits_kernel.arg_names
            if a.startswith("stride_") or a in ("nblk", "chunk_blocks")}
    configs = []
    for dtype, dg in ((torch.bfloat16, 128), (torch.float16, 128), (torch.float32, 64), (torch.float16, 96)):
        dt = "*" + TRITON_DTYPE[dtype]
        configs.append(aot_config(
            f"gate_logits-{TRITON_DTYPE[dtype]}-Dg{dg}", _gate_logits_kernel,
            dict(ints, q_ptr=dt, k_ptr=dt, num_blocks_ptr="*i32", logits_ptr="*fp32", part_ptr="*fp32",
                 qk_scale="fp32"),
            dict(BLOCK_J=blocks_per_tile(dg), DG=dg, DG_PAD=triton.next_power_of_2(dg)), num_warps=4))
    ints = {a: "i32" for a in _gate_normalize_kernel.arg_names
            if a.startswith("stride_") or a in ("nblk", "chunks", "chunk_blocks")}
    for dg in (128, 64):
        configs.append(aot_config(
            f"gate_normalize-BJ{blocks_per_tile(dg)}", _gate_normalize_kernel,
            dict(ints, out_ptr="*fp32", part_ptr="*fp32", num_blocks_ptr="*i32"),
            dict(BLOCK_J=blocks_per_tile(dg), PART_TILE=PART_TILE), num_warps=4))
    return configs
