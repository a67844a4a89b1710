"""Block selection (top-k by budget, or by threshold, plus forced sink/last blocks) in Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import AotConfig, aot_config


@triton.jit
def _order_key(s):
    """int32 keys ordered like the fp32 values ``s`` (-0.0 and +0.0 equal)."""
    bits = s.to(tl.int32, bitcast=True)
    # Negative floats order in reverse of their magnitude bits: flip all but the sign.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(s == 0.0, 0, key)


@triton.jit(do_not_specialize=["nblk", "num_slots", "keep_top"])
def _select_blocks_kernel(
    scores_ptr, num_blocks_ptr, seqlens_ptr, out_ptr, nblk, num_slots, keep_top, threshold,
    stride_sb, stride_sh, stride_sn, stride_ob, stride_oh,
    BLOCK_SIZE: tl.constexpr, NBLK_PAD: tl.constexpr, SLOTS_PAD: tl.constexpr,
    BY_BUDGET: tl.constexpr, SINK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    scored = tl.minimum(tl.load(num_blocks_ptr + pid_b), nblk)
    seqlen = tl.load(seqlens_ptr + pid_b)
    j = tl.arange(0, NBLK_PAD)
    is_scored = j < scored
    s = tl.load(scores_ptr + pid_b.to(tl.int64) * stride_sb + pid_h * stride_sh + j * stride_sn,
                mask=is_scored, other=0.0)

    if BY_BUDGET:
        k = tl.minimum(keep_top, scored)
        key = _order_key(s)
        # Bisection on the key for t = the k-th largest: the largest t with at least k
        # scored keys >= t. 32 halvings of the int32 range, O(Nblk) each.
        lo = tl.full([], -(2**31), tl.int64)
        hi = tl.full([], 2**31 - 1, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            enough = tl.sum(((key >= mid) & is_scored).to(tl.int32), axis=0) >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
        above = (key > lo) & is_scored
        # Keys equal to t fill the remaining places, lower block ids first.
        tie = (key == lo) & is_scored
        tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)
        keep = above | (tie & (tie_rank <= k - tl.sum(above.to(tl.int32), axis=0)))
    else:
        keep = is_scored & (s > threshold)

    # Forced blocks (only for a non-empty row): the sink 0 and the current block `last`.
    # -1 stands for "none"; it also keeps integer division away from negative operands,
    # where the interpreter (floor) and compiled code (truncation) differ.
    nonempty = seqlen > 0
    last = tl.where(nonempty, tl.maximum(seqlen - 1, 0) // BLOCK_SIZE, -1)
    keep = keep | (j == last)
    if SINK:
        keep = keep | (j == tl.where(nonempty, 0, -1))

    out_row = out_ptr + pid_b.to(tl.int64) * stride_ob + pid_h * stride_oh
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(out_row + pos, j, mask=keep & (pos < num_slots))
    count = tl.sum(keep.to(tl.int32), axis=0)
    # `last` past the scores' width sorts after every kept id; then -1 padding.
    p = tl.arange(0, SLOTS_PAD)
    tail = tl.where(p == tl.where(last >= NBLK_PAD, count, -1), last, -1)
    tl.store(out_row + p, tail, mask=(p >= count) & (p < num_slots))


def _warps(nblk_pad: int) -> int:
    return 4 if nblk_pad <= 2048 else 8


def select_blocks(scores, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block):
    """Launch one program per (row, KV head); inputs are validated.

    scores [B, Hkv, Nblk] fp32, num_blocks / cache_seqlens [B] int32,
    exactly one of token_budget / threshold. Returns block_indices [B, Hkv, M] int32:
    the top min(token_budget // block_size, num_blocks) scored blocks (ties: lower id) or
    those with score > threshold, plus block 0 (sink_block) and (cache_seqlens-1)//block_size
    for non-empty rows, ascending and unique, then -1. M = min(token_budget // block_size,
    Nblk) + 2, or Nblk + 2. Compiles per block_size, mode, sink_block and the next powers
    of 2 of Nblk and M.
    """
    batch, hkv, nblk = scores.shape
    by_budget = token_budget is not None
    keep_top = token_budget // block_size if by_budget else 0
    num_slots = (min(keep_top, nblk) if by_budget else nblk) + 2
    out = torch.empty((batch, hkv, num_slots), dtype=torch.int32, device=scores.device)
    if batch * hkv == 0:
        return out
    nblk_pad = max(1, triton.next_power_of_2(nblk))
    _select_blocks_kernel[(batch, hkv)](
        scores, num_blocks, cache_seqlens, out, nblk, num_slots, keep_top,
        float(threshold) if threshold is not None else 0.0,
        scores.stride(0), scores.stride(1), scores.stride(2), out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, NBLK_PAD=nblk_pad, SLOTS_PAD=triton.next_power_of_2(num_slots),
        BY_BUDGET=by_budget, SINK=bool(sink_block), num_warps=_warps(nblk_pad),
    )
    return out


def aot_configs() -> list[AotConfig]:
    """AOT builds: budget with sink over 2k blocks (128k tokens of 64), threshold without."""
    ints = {a: "i32" for a in _select_blocks_kernel.arg_names
            if a.startswith("stride_") or a in ("nblk", "num_slots", "keep_top")}
    types = dict(ints, scores_ptr="*fp32", num_blocks_ptr="*i32", seqlens_ptr="*i32", out_ptr="*i32",
                 threshold="fp32")
    return [
        aot_config(f"select_blocks-{mode}", _select_blocks_kernel, types,
                   dict(BLOCK_SIZE=64, NBLK_PAD=nblk_pad, SLOTS_PAD=slots_pad, BY_BUDGET=by_budget, SINK=sink),
                   num_warps=_warps(nblk_pad))
        for mode, nblk_pad, slots_pad, by_budget, sink in (("budget", 2048, 128, True, True),
                                                           ("threshold", 512, 1024, False, False))
    ]
