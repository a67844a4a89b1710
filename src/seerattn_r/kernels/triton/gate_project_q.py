"""The gate's query branch at decode in one kernel: grouped projection, RMSNorm and RoPE.

One program per KV head and 16 rows of the batch: the rows' grouped queries ``[16, g*D]``
times the head's ``Wq [g*D, Dg]`` on the matrix cores, the weight streamed once per 16
rows (pipelined loads) instead of once per row. Also home of :func:`norm_rope_store`,
the epilogue the compression-cache kernels (:mod:`.gate_cache`) share.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, AotConfig, aot_config, dot, interpreting, is_hip

# Rows of the batch per program (the smallest M of an mma / mfma tile).
BLOCK_B = 16
# Reduction chunk: a stage holds [16, 64] queries and two [64, Dg/2] weight tiles (18 KiB
# in fp16 at Dg 128).
BLOCK_K = 64


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


@triton.jit(do_not_specialize=["batch"])
def _gate_project_q_kernel(
    q_ptr, w_ptr, norm_ptr, inv_freq_ptr, pos_ptr, out_ptr, attention_scaling, eps,
    batch, group,
    stride_qb, stride_qh, stride_wh, stride_wk, stride_ob, stride_oh,
    D: tl.constexpr, HALF: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, HALF_PAD: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_r * BLOCK_B + tl.arange(0, BLOCK_B)
    r_mask = rows < batch
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, HALF_PAD)
    n_mask = offs_n < HALF
    # The group's g query heads are consecutive: together one input row of g*D.
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qb + (pid_h * group).to(tl.int64) * stride_qh
    w_head = w_ptr + pid_h.to(tl.int64) * stride_wh
    acc1 = tl.zeros([BLOCK_B, HALF_PAD], tl.float32)
    acc2 = tl.zeros([BLOCK_B, HALF_PAD], tl.float32)
    for k0 in range(0, group * D, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < group * D
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
    pos = tl.load(pos_ptr + rows, mask=r_mask, other=0)
    out = out_ptr + rows.to(tl.int64)[:, None] * stride_ob + pid_h * stride_oh + offs_n[None, :]
    norm_rope_store(acc1, acc2, out, r_mask[:, None] & n_mask[None, :], norm_ptr, inv_freq_ptr, pos,
                    attention_scaling, eps, offs_n, n_mask, HALF)


def _half_pad(dg: int) -> int:
    return max(16, triton.next_power_of_2(dg // 2))


def _stages(hip: bool) -> int:
    """Pipeline depth. At decode batch sizes only Hkv x ceil(B/16) programs run (8 at
    B 16), each streaming 256 KiB of weight, so a program's speed is the bytes it keeps in
    flight: 5 stages (90 KiB of shared memory) on NVIDIA; 2 within AMD's 64 KiB of LDS."""
    return 2 if hip else 5


def gate_project_q(q_pre, weight, norm_weight, inv_freq, positions, attention_scaling, eps):
    """Launch one program per 16 rows and KV head; inputs are validated.

    q_pre [B, Hq, D] (last dim contiguous), weight [Hkv, g, D, Dg] contiguous, norm_weight
    [Dg], inv_freq [Dg/2] fp32, positions [B] int32/int64. Returns [B, Hkv, Dg] in
    q_pre's dtype: q_pre cast to the weight's dtype, fp32 accumulation, norm and RoPE.
    Compiles once per dtype triple, D and Dg (constants, so the masks are uniform and the
    loads vectorize and pipeline); B and g are run-time values.
    """
    batch = q_pre.shape[0]
    hkv, group, d, dg = weight.shape
    out = torch.empty((batch, hkv, dg), dtype=q_pre.dtype, device=q_pre.device)
    if out.numel() == 0:
        return out
    _gate_project_q_kernel[(triton.cdiv(batch, BLOCK_B), hkv)](
        q_pre, weight, norm_weight, inv_freq, positions, out, attention_scaling, eps,
        batch, group,
        q_pre.stride(0), q_pre.stride(1), weight.stride(0), weight.stride(2), out.stride(0), out.stride(1),
        D=d, HALF=dg // 2, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, HALF_PAD=_half_pad(dg), INTERPRET=interpreting(),
        num_warps=4, num_stages=_stages(is_hip()),
    )
    return out


def aot_configs() -> list[AotConfig]:
    """AOT builds: fp16 and bf16 with Dg 128 (published gates), fp32 with Dg 64."""
    ints = {a: "i32" for a in _gate_project_q_kernel.arg_names
            if a.startswith("stride_") or a in ("batch", "group")}
    configs = []
    for dtype, d, dg in ((torch.float16, 128, 128), (torch.bfloat16, 128, 128), (torch.float32, 64, 64)):
        dt = "*" + TRITON_DTYPE[dtype]
        configs.append(aot_config(
            f"gate_project_q-{TRITON_DTYPE[dtype]}-D{d}-Dg{dg}", _gate_project_q_kernel,
            dict(ints, q_ptr=dt, w_ptr=dt, norm_ptr=dt, inv_freq_ptr="*fp32", pos_ptr="*i64", out_ptr=dt,
                 attention_scaling="fp32", eps="fp32"),
            dict(D=d, HALF=dg // 2, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K, HALF_PAD=_half_pad(dg), INTERPRET=False),
            matrix_cores=dtype != torch.float32, hip_options=dict(num_stages=_stages(True)), num_warps=4,
            num_stages=_stages(False)))
    return configs
