"""Gate block probabilities, ``softmax(q . k * sm_scale)`` over the scored blocks, in Triton."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, AotConfig, aot_config

# Elements of one [blocks, Dg] tile held in registers at a time.
TILE_ELEMS = 4096


@triton.jit
def _block_logits(k_row, q, offs_j, offs_g, g_mask, j_mask, stride_kn, qk_scale):
    """Scaled logits (log2 units) of blocks ``offs_j``: [BLOCK_J] fp32."""
    k = tl.load(k_row + offs_j.to(tl.int64)[:, None] * stride_kn + offs_g[None, :],
                mask=j_mask[:, None] & g_mask[None, :], other=0.0).to(tl.float32)
    return tl.sum(k * q[None, :], axis=1) * qk_scale


@triton.jit(do_not_specialize=["nblk"])
def _gate_scores_kernel(
    q_ptr, k_ptr, num_blocks_ptr, out_ptr, qk_scale, nblk, dg,
    stride_qb, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_ob, stride_oh,
    BLOCK_J: tl.constexpr, DG_PAD: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    scored = tl.load(num_blocks_ptr + pid_b)
    offs_g = tl.arange(0, DG_PAD)
    g_mask = offs_g < dg
    q = tl.load(q_ptr + pid_b * stride_qb + pid_h * stride_qh + offs_g, mask=g_mask, other=0.0).to(tl.float32)
    k_row = k_ptr + pid_b.to(tl.int64) * stride_kb + pid_h * stride_kh
    offs = tl.arange(0, BLOCK_J)

    # Pass 1: running max and sum of exp2 over the scored blocks.
    m = tl.max(tl.full([BLOCK_J], float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros([BLOCK_J], tl.float32), axis=0)
    for j0 in range(0, scored, BLOCK_J):
        j_mask = j0 + offs < scored
        logits = tl.where(j_mask, _block_logits(k_row, q, j0 + offs, offs_g, g_mask, j_mask, stride_kn, qk_scale),
                          float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=0))
        total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(logits - m_new), axis=0)
        m = m_new

    # Pass 2: recompute the logits (k_gate is small) and write every block, 0 past `scored`.
    out_row = out_ptr + pid_b.to(tl.int64) * stride_ob + pid_h * stride_oh
    for j0 in range(0, nblk, BLOCK_J):
        j = j0 + offs
        j_mask = j < scored
        logits = _block_logits(k_row, q, j, offs_g, g_mask, j_mask, stride_kn, qk_scale)
        prob = tl.where(j_mask, tl.exp2(logits - m) / total, 0.0)
        tl.store(out_row + j, prob, mask=j < nblk)


def _blocks_per_tile(dg_pad: int) -> int:
    return max(1, min(TILE_ELEMS // dg_pad, 64))


def gate_scores(q_gate, k_gate, num_blocks, sm_scale):
    """Launch one program per (row, KV head); inputs are validated.

    q_gate [B, Hkv, Dg], k_gate [B, Nblk, Hkv, Dg] (fp16/bf16/fp32, last dim contiguous),
    num_blocks [B] int32. Returns [B, Hkv, Nblk] fp32: softmax over blocks
    j < num_blocks[b], exactly 0 elsewhere. Compiles once per dtype pair and next power of 2
    of Dg; Nblk and batch do not recompile.
    """
    batch, hkv, dg = q_gate.shape
    nblk = k_gate.shape[1]
    out = torch.empty((batch, hkv, nblk), dtype=torch.float32, device=q_gate.device)
    if out.numel() == 0:
        return out
    dg_pad = triton.next_power_of_2(dg)
    _gate_scores_kernel[(batch, hkv)](
        q_gate, k_gate, num_blocks, out, sm_scale * math.log2(math.e), nblk, dg,
        q_gate.stride(0), q_gate.stride(1),
        k_gate.stride(0), k_gate.stride(1), k_gate.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_J=_blocks_per_tile(dg_pad), DG_PAD=dg_pad, num_warps=4,
    )
    return out


def aot_configs() -> list[AotConfig]:
    """AOT builds: bf16 gates with Dg 128 (the published ones) and fp32 with Dg 64."""
    ints = {a: "i32" for a in _gate_scores_kernel.arg_names if a.startswith("stride_") or a in ("nblk", "dg")}
    configs = []
    for dtype, dg in ((torch.bfloat16, 128), (torch.float32, 64)):
        dt = "*" + TRITON_DTYPE[dtype]
        configs.append(aot_config(
            f"gate_scores-{TRITON_DTYPE[dtype]}-Dg{dg}", _gate_scores_kernel,
            dict(ints, q_ptr=dt, k_ptr=dt, num_blocks_ptr="*i32", out_ptr="*fp32", qk_scale="fp32"),
            dict(BLOCK_J=_blocks_per_tile(dg), DG_PAD=dg), num_warps=4))
    return configs
