"""The gate's query branch at decode in one kernel: grouped projection, RMSNorm and RoPE.

Split-K over the ``g*D`` reduction: program ``(s, r, h)`` multiplies the grouped queries
``[16, g*D]`` of rows ``16r .. 16r+15`` by its share of KV head ``h``'s ``Wq [g*D, Dg]``
on the matrix cores and writes an fp32 partial product. At decode batch sizes there are
only ``Hkv * ceil(B/16)`` (row block, head) tiles, 8 for Qwen3-4B at B <= 16, and one
program streaming a whole 256 KiB weight slice is latency-bound; with the split about
one program per SM streams the weight at once. The last program of a tile to finish (a
ticket from an atomic counter) sums the partials in a fixed order, so the result does not
depend on timing, and applies RMSNorm and RoPE: one launch. Also home of
:func:`norm_rope_store`, the epilogue the compression-cache kernels (:mod:`.gate_cache`)
share.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, AotConfig, aot_config, compute_units, dot, interpreting, is_hip

# Rows of the batch per program (the smallest M of an mma / mfma tile).
BLOCK_B = 16
# Reduction chunk, the unit of the split: a stage holds [16, 64] queries and two [64, Dg/2]
# weight tiles (18 KiB in fp16 at Dg 128).
BLOCK_K = 64
# Partials the finishing program sums per step: [16, 4, Dg/2] fp32 per half, 64 registers
# a thread at Dg 128 with 4 warps.
SPLIT_TILE = 4


@triton.jit
def norm_rope_store(y1, y2, out_ptrs, out_mask, norm_ptr, inv_freq_ptr, pos, attention_scaling, eps, offs_n,
                    n_mask, HALF):
    """RMSNorm over the ``2 * HALF`` channels of each row, rotate-half RoPE, store.

    y1, y2: ``[R, HALF_PAD]`` fp32, the first and second half of each row's projection
    (kept apart so RoPE needs no register shuffle); pos: ``[R]`` integer positions;
    out_ptrs: ``[R, HALF_PAD]`` pointers to channels ``offs_n`` of each output row. The
    angle is ``float32(pos) * inv_freq`` as in the torch path, so long positions round the
    same way; cos and sin are computed here, not read from a table.
    """
    ss = tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1)
    r = (1.0 / tl.sqrt(ss / (2 * HALF) + eps))[:, None]
    a = y1 * r * tl.load(norm_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    b = y2 * r * tl.load(norm_ptr + HALF + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    angle = pos.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    cos = tl.cos(angle) * attention_scaling
    sin = tl.sin(angle) * attention_scaling
    tl.store(out_ptrs, (a * cos - b * sin).to(out_ptrs.dtype.element_ty), mask=out_mask)
    tl.store(out_ptrs + HALF, (b * cos + a * sin).to(out_ptrs.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["batch", "group", "chunks_per_split"])
def _gate_project_q_kernel(
    q_ptr, w_ptr, norm_ptr, inv_freq_ptr, pos_ptr, out_ptr, part_ptr, ticket_ptr, attention_scaling, eps,
    batch, group, chunks_per_split,
    stride_qb, stride_qh, stride_wh, stride_wk, stride_ob, stride_oh, stride_ps, stride_pb, stride_ph,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
    HALF_PAD: tl.constexpr, SPLIT_TILE: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_h = tl.program_id(2)
    num_splits = tl.num_programs(0)
    rows = pid_r * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < batch
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, HALF_PAD)
    n_mask = offs_n < HALF
    # The group's g query heads are consecutive: together one input row of g*D.
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qb + (pid_h * group).to(tl.int64) * stride_qh
    w_head = w_ptr + pid_h.to(tl.int64) * stride_wh
    k_begin = pid_s * chunks_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + chunks_per_split * BLOCK_K, group * D)
    acc1 = tl.zeros([BLOCK_B, HALF_PAD], tl.float32)
    acc2 = tl.zeros([BLOCK_B, HALF_PAD], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_end
        x = tl.load(q_rows + ((k // D) * stride_qh + k % D)[None, :], mask=r_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = w_head + k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :]
        w_mask = k_mask[:, None] & n_mask[None, :]
        w1 = tl.load(w, mask=w_mask, other=0.0)
        w2 = tl.load(w + HALF, mask=w_mask, other=0.0)
        # The torch path also multiplies in the weight's dtype (fp32 accumulation here).
        x = x.to(w1.dtype)
        acc1 += dot(x, w1, INTERPRET)
        acc2 += dot(x, w2, INTERPRET)
    out_mask = r_mask[:, None] & n_mask[None, :]
    part = part_ptr + rows.to(tl.int64)[:, None] * stride_pb + pid_h * stride_ph + offs_n[None, :]
    tl.store(part + pid_s.to(tl.int64) * stride_ps, acc1, mask=out_mask)
    tl.store(part + pid_s.to(tl.int64) * stride_ps + HALF, acc2, mask=out_mask)
    # Every thread's partial is written before the ticket; the ticket's release (acquire
    # for the finishing program) orders them for the program that reads them.
    tl.debug_barrier()
    ticket = ticket_ptr + pid_r * tl.num_programs(2) + pid_h
    if tl.atomic_add(ticket, 1, sem="acq_rel") == num_splits - 1:
        # Every other program of the tile is done with the counter: zero it for the next launch.
        tl.store(ticket, 0)
        y1 = tl.zeros([BLOCK_B, HALF_PAD], tl.float32)
        y2 = tl.zeros([BLOCK_B, HALF_PAD], tl.float32)
        offs_s = tl.arange(0, SPLIT_TILE)
        for s0 in range(0, num_splits, SPLIT_TILE):
            s = s0 + offs_s
            ptrs = part[:, None, :] + s.to(tl.int64)[None, :, None] * stride_ps
            mask = out_mask[:, None, :] & (s < num_splits)[None, :, None]
            # .cg: other SMs wrote these, read them from L2, never a stale L1 line.
            y1 += tl.sum(tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
            y2 += tl.sum(tl.load(ptrs + HALF, mask=mask, other=0.0, cache_modifier=".cg"), axis=1)
        pos = tl.load(pos_ptr + rows, mask=r_mask, other=0)
        out = out_ptr + rows.to(tl.int64)[:, None] * stride_ob + pid_h * stride_oh + offs_n[None, :]
        norm_rope_store(y1, y2, out, out_mask, norm_ptr, inv_freq_ptr, pos, attention_scaling, eps, offs_n,
                        n_mask, HALF)


def _half_pad(dg: int) -> int:
    return max(16, triton.next_power_of_2(dg // 2))


def _stages(hip: bool) -> int:
    """Pipeline depth for a program's share of the reduction (many chunks at large batch,
    where the split is 1): 5 stages (90 KiB of shared memory) on NVIDIA; 2 within AMD's
    64 KiB of LDS."""
    return 2 if hip else 5


def split_plan(k_total: int, wanted: int) -> tuple[int, int]:
    """``(num_splits, chunks_per_split)``: the ``k_total = g*D`` reduction in chunks of
    BLOCK_K, shared by at most ``wanted`` programs (at least one, every share non-empty)."""
    chunks = triton.cdiv(k_total, BLOCK_K)
    per = triton.cdiv(chunks, max(1, min(chunks, wanted)))
    return triton.cdiv(chunks, per), per


# Split-K tickets: one int32 counter per (row block, KV head), zero between launches (the
# finishing program resets its own). Per device and stream, so launches that may overlap
# never share counters; stream-ordered launches on one stream reuse them, with no memset
# and no host sync, so the launch captures in a CUDA graph (the graph keeps the buffer's
# address, so a buffer that is outgrown is kept alive, never freed). Two replays of graphs
# captured on one stream must not run concurrently.
_TICKETS: dict[tuple, torch.Tensor] = {}
_OUTGROWN: list[torch.Tensor] = []


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    buf = _TICKETS.get((device, stream))
    if buf is None or buf.numel() < n:
        if buf is not None:
            _OUTGROWN.append(buf)
        buf = torch.zeros(max(n, 256, 0 if buf is None else 2 * buf.numel()), dtype=torch.int32, device=device)
        _TICKETS[(device, stream)] = buf
    return buf


def gate_project_q(q_pre, weight, norm_weight, inv_freq, positions, attention_scaling, eps, *, num_splits=None):
    """Launch ``num_splits x ceil(B/16) x Hkv`` programs; inputs are validated.

    q_pre [B, Hq, D] (last dim contiguous), weight [Hkv, g, D, Dg] contiguous, norm_weight
    [Dg], inv_freq [Dg/2] fp32, positions [B] int32/int64. Returns [B, Hkv, Dg] in
    q_pre's dtype: q_pre cast to the weight's dtype, fp32 accumulation, norm and RoPE.
    num_splits: how many programs share each tile's reduction (clamped to the number of
    BLOCK_K chunks, rounded so none is empty; see :func:`split_plan`); default about one
    program per SM / CU.
    Allocates the output and an fp32 workspace ``[splits, B, Hkv, Dg]``. Compiles once per
    dtype triple, D and Dg (constants, so the masks are uniform and the loads vectorize and
    pipeline); B, g and the split are run-time values.
    """
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)):
        raise TypeError(f"num_splits must be an int or None, got {type(num_splits).__name__}")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    batch = q_pre.shape[0]
    hkv, group, d, dg = weight.shape
    out = torch.empty((batch, hkv, dg), dtype=q_pre.dtype, device=q_pre.device)
    if out.numel() == 0:
        return out
    row_blocks = triton.cdiv(batch, BLOCK_B)
    if num_splits is None:
        # About one program per SM / CU. Qwen3-4B (Hkv 8, g*D 1024) on 132 SMs: 16 splits of
        # one chunk, 128 programs, at B 1..16; 4 splits at B 64; no split from B 257.
        num_splits = triton.cdiv(compute_units(q_pre.device), row_blocks * hkv)
    splits, per = split_plan(group * d, num_splits)
    part = torch.empty((splits, batch, hkv, dg), dtype=torch.float32, device=q_pre.device)
    _gate_project_q_kernel[(splits, row_blocks, hkv)](
        q_pre, weight, norm_weight, inv_freq, positions, out, part, _tickets(q_pre.device, row_blocks * hkv),
        attention_scaling, eps,
        batch, group, per,
        q_pre.stride(0), q_pre.stride(1), weight.stride(0), weight.stride(2), out.stride(0), out.stride(1),
        part.stride(0), part.stride(1), part.stride(2),
        D=d, HALF=dg // 2, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, HALF_PAD=_half_pad(dg), SPLIT_TILE=SPLIT_TILE,
        INTERPRET=interpreting(), num_warps=4, num_stages=_stages(is_hip()),
    )
    return out


def aot_configs() -> list[AotConfig]:
    """AOT builds: fp16 and bf16 with Dg 128 (published gates), fp32 with Dg 64."""
    ints = {a: "i32" for a in _gate_project_q_kernel.arg_names
            if a.startswith("stride_") or a in ("batch", "group", "chunks_per_split")}
    configs = []
    for dtype, d, dg in ((torch.float16, 128, 128), (torch.bfloat16, 128, 128), (torch.float32, 64, 64)):
        dt = "*" + TRITON_DTYPE[dtype]
        configs.append(aot_config(
            f"gate_project_q-{TRITON_DTYPE[dtype]}-D{d}-Dg{dg}", _gate_project_q_kernel,
            dict(ints, q_ptr=dt, w_ptr=dt, norm_ptr=dt, inv_freq_ptr="*fp32", pos_ptr="*i64", out_ptr=dt,
                 part_ptr="*fp32", ticket_ptr="*i32", attention_scaling="fp32", eps="fp32"),
            dict(D=d, HALF=dg // 2, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, HALF_PAD=_half_pad(dg), SPLIT_TILE=SPLIT_TILE,
                 INTERPRET=False),
            matrix_cores=dtype != torch.float32, hip_options=dict(num_stages=_stages(True)), num_warps=4,
            num_stages=_stages(False)))
    return configs
