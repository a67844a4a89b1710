"""Block selection (top-k by budget, or by threshold, plus forced sink/last blocks) in Triton.

One program per (row, KV head) holds the row's scores in registers. The budget's top k is
a radix select on the scores' order-preserving integer keys: four histogram passes of 8
bits find the k-th largest key (a bisection over the key range takes 32 counting passes). The same kernel also selects straight from gate logits and their softmax
partials (``FROM_LOGITS``, the fused :mod:`.gate_select`), recomputing the probabilities
exactly as :mod:`.gate_scores` writes them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import AotConfig, aot_config
from .gate_scores import PART_TILE, probs, row_stats


@triton.jit
def _order_key(s):
    """int32 keys ordered like the fp32 values ``s`` (-0.0 and +0.0 equal)."""
    bits = s.to(tl.int32, bitcast=True)
    # Negative floats order in reverse of their magnitude bits: flip all but the sign.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(s == 0.0, 0, key)


@triton.jit
def _kth_largest(ukey, is_scored, scored, k, NBLK_PAD: tl.constexpr):
    """Radix select: (t, r) with t the k-th largest of the scored keys (int64 in
    [0, 2**32)) and r how many keys equal to t belong to the top k; t = 2**32 - 1 and r = 0
    when k = 0.

    Four passes of 8 bits, high to low. Each pass histograms the next digit of the keys
    that match the digits fixed so far (the candidates) and fixes the largest digit d with
    at least ``remaining`` candidates at or above it; those strictly above are in the top k.
    """
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int64)
    remaining = k
    candidates = scored
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        cand = is_scored & ((ukey >> (shift + 8)) == (prefix >> (shift + 8)))
        # Non-candidates go to bin 0 and are taken out again below (without relying on
        # tl.histogram's newer mask argument).
        digit = tl.where(cand, ((ukey >> shift) & 255).to(tl.int32), 0)
        hist = tl.histogram(digit, 256) - tl.where(bins == 0, NBLK_PAD - candidates, 0)
        at_or_above = candidates - tl.cumsum(hist, axis=0) + hist
        # at_or_above falls with the digit: the digits with enough candidates are a prefix.
        d = tl.sum((at_or_above >= remaining).to(tl.int32), axis=0) - 1
        remaining -= tl.sum(tl.where(bins == d, at_or_above - hist, 0), axis=0)
        candidates = tl.sum(tl.where(bins == d, hist, 0), axis=0)
        prefix += d.to(tl.int64) << shift
    return prefix, remaining


@triton.jit(do_not_specialize=["nblk", "num_slots", "keep_top", "chunks"])
def _select_blocks_kernel(
    scores_ptr, part_ptr, num_blocks_ptr, seqlens_ptr, out_ptr, nblk, num_slots, keep_top, threshold, chunks,
    stride_sb, stride_sh, stride_sn, stride_pb, stride_ph, stride_ob, stride_oh,
    BLOCK_SIZE: tl.constexpr, NBLK_PAD: tl.constexpr,
    BY_BUDGET: tl.constexpr, SINK: tl.constexpr, FROM_LOGITS: tl.constexpr, PART_TILE: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    scored = tl.minimum(tl.load(num_blocks_ptr + pid_b), nblk)
    seqlen = tl.load(seqlens_ptr + pid_b)
    j = tl.arange(0, NBLK_PAD)
    is_scored = j < scored
    scores_row = scores_ptr + pid_b.to(tl.int64) * stride_sb + pid_h * stride_sh + j * stride_sn
    if FROM_LOGITS:
        # gate_scores' probabilities, recomputed exactly as its normalize kernel does.
        m, total = row_stats(part_ptr + pid_b.to(tl.int64) * stride_pb + pid_h * stride_ph, 2, chunks, PART_TILE)
        logits = tl.load(scores_row, mask=is_scored, other=float("-inf"))
        s = tl.where(is_scored, probs(logits, m, total), 0.0)
    else:
        s = tl.load(scores_row, mask=is_scored, other=0.0)

    if BY_BUDGET:
        k = tl.minimum(keep_top, scored)
        ukey = _order_key(s).to(tl.int64) + 2**31
        t, take = _kth_largest(ukey, is_scored, scored, k, NBLK_PAD)
        # Keys equal to t fill the remaining places, lower block ids first.
        tie = (ukey == t) & is_scored
        keep = ((ukey > t) & is_scored) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= take))
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
    # `last` past the scores' width sorts after every kept id; then -1 padding. M is at
    # most Nblk + 2, so this takes one or two tiles of the row's width (and M never
    # specializes the kernel).
    at = tl.where(last >= NBLK_PAD, count, -1)
    for p0 in range(0, num_slots, NBLK_PAD):
        p = p0 + j
        tl.store(out_row + p, tl.where(p == at, last, -1), mask=(p >= count) & (p < num_slots))


def _warps(nblk_pad: int) -> int:
    return 4 if nblk_pad <= 2048 else 8


def _nblk_pad(nblk: int) -> int:
    # At least one element per thread at 4 warps of 64 lanes (AMD), so the histogram's
    # input is never replicated across threads.
    return max(256, triton.next_power_of_2(nblk))


def launch(values, part, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block):
    """Run the selection kernel on ``values`` [B, Hkv, Nblk] fp32: probabilities, or with
    ``part`` (the [B, Hkv, chunks, 2] partials of :func:`.gate_scores.gate_logits`) the
    logits they come from. Inputs are validated; returns block_indices [B, Hkv, M] int32."""
    batch, hkv, nblk = values.shape
    by_budget = token_budget is not None
    keep_top = token_budget // block_size if by_budget else 0
    num_slots = (min(keep_top, nblk) if by_budget else nblk) + 2
    out = torch.empty((batch, hkv, num_slots), dtype=torch.int32, device=values.device)
    if batch * hkv == 0:
        return out
    from_logits = part is not None
    part_args = (part, part.shape[2], part.stride(0), part.stride(1)) if from_logits else (values, 0, 0, 0)
    nblk_pad = _nblk_pad(nblk)
    _select_blocks_kernel[(batch, hkv)](
        values, part_args[0], num_blocks, cache_seqlens, out, nblk, num_slots, keep_top,
        float(threshold) if threshold is not None else 0.0, part_args[1],
        values.stride(0), values.stride(1), values.stride(2), part_args[2], part_args[3],
        out.stride(0), out.stride(1),
        BLOCK_SIZE=block_size, NBLK_PAD=nblk_pad,
        BY_BUDGET=by_budget, SINK=bool(sink_block), FROM_LOGITS=from_logits, PART_TILE=PART_TILE,
        num_warps=_warps(nblk_pad),
    )
    return out


def select_blocks(scores, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block):
    """Launch one program per (row, KV head); inputs are validated.

    scores [B, Hkv, Nblk] fp32, num_blocks / cache_seqlens [B] int32,
    exactly one of token_budget / threshold. Returns block_indices [B, Hkv, M] int32:
    the top min(token_budget // block_size, num_blocks) scored blocks (ties: lower id) or
    those with score > threshold, plus block 0 (sink_block) and (cache_seqlens-1)//block_size
    for non-empty rows, ascending and unique, then -1. M = min(token_budget // block_size,
    Nblk) + 2, or Nblk + 2. Compiles per block_size, mode, sink_block and the next power
    of 2 of Nblk (at least 256); M and the lengths do not recompile.
    """
    return launch(scores, None, num_blocks, cache_seqlens, block_size, token_budget, threshold, sink_block)


def aot_configs() -> list[AotConfig]:
    """AOT builds: budget with sink over 2k blocks (128k tokens of 64) from probabilities and
    from logits (the fused gate_select), threshold without sink."""
    ints = {a: "i32" for a in _select_blocks_kernel.arg_names
            if a.startswith("stride_") or a in ("nblk", "num_slots", "keep_top", "chunks")}
    types = dict(ints, scores_ptr="*fp32", part_ptr="*fp32", num_blocks_ptr="*i32", seqlens_ptr="*i32",
                 out_ptr="*i32", threshold="fp32")
    return [
        aot_config(f"select_blocks-{mode}", _select_blocks_kernel, types,
                   dict(BLOCK_SIZE=64, NBLK_PAD=nblk_pad, BY_BUDGET=by_budget, SINK=sink,
                        FROM_LOGITS=from_logits, PART_TILE=PART_TILE),
                   num_warps=_warps(nblk_pad))
        for mode, nblk_pad, by_budget, sink, from_logits in (
            ("budget", 2048, True, True, False),
            ("budget-logits", 512, True, True, True),
            ("threshold", 512, False, False, False),
            ("threshold-logits", 4096, False, True, True),
        )
    ]
