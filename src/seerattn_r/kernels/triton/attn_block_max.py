"""Triton kernel of ``attn_block_max``: causal flash-attention forward plus the gate target.

One program owns ``BLOCK_M`` query positions of one sequence and *all* query heads of one
KV head's GQA group, stacked as ``BLOCK_M * GROUP_PAD`` rows, so the group max is a
register reduction and the target is written once per KV head (``[B, Hkv, S, Nblk]``).

* Loop 1 is an ordinary flash-attention forward (online softmax in base 2), giving the
  layer's output and each row's final log-sum-exp.
* Loop 2 revisits the blocks strictly before each row's own block and recomputes only
  ``q . k`` (no V, no P.V): ``max_{s in block} p = exp2(max_{s in block} logit - lse)``, so
  the block maxima come out already rescaled by the final row max and sum, and one
  ``exp2`` per block (not per key) suffices. It costs about half of loop 1.
* Loop 3 renormalises the stored row to sum 1 and zero-fills the blocks a row may not see.

Nothing ``S x S`` is materialised. Compiles once per (dtype, head dims, group, block size,
varlen or not); sequence lengths are runtime values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from seerattn_r.kernels.triton._common import TRITON_DTYPE, dot, interpreting, is_hip


@triton.jit(do_not_specialize=["seqlen", "nblk"])
def _attn_block_max_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    bm_ptr,
    cu_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_bb,
    stride_bh,
    stride_bs,
    seqlen,
    nblk,
    sm_scale_log2,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_J: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_seq = tl.program_id(1)
    hkv = tl.program_id(2)
    if IS_VARLEN:
        start = tl.load(cu_ptr + pid_seq)
        length = tl.load(cu_ptr + pid_seq + 1) - start
        batch = 0
    else:
        start = 0
        length = seqlen
        batch = pid_seq
    m0 = pid_m * BLOCK_M
    if m0 >= length:
        return

    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    offs_r = tl.arange(0, ROWS)
    pos_r = m0 + offs_r // GROUP_PAD
    head_r = offs_r % GROUP_PAD
    row_ok = (pos_r < length) & (head_r < GROUP)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)

    q_ptrs = (
        q_ptr
        + batch * stride_qb
        + (start + pos_r)[:, None] * stride_qs
        + (hkv * GROUP + head_r)[:, None] * stride_qh
        + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + batch * stride_kb + start * stride_ks + hkv * stride_kh
    v_base = v_ptr + batch * stride_vb + start * stride_vs + hkv * stride_vh

    # Loop 1: flash-attention forward over keys 0 .. last row of the tile.
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_V], dtype=tl.float32)
    kv_end = tl.minimum(m0 + BLOCK_M, length)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
        qk = dot(q, tl.trans(k), INTERPRET) * sm_scale_log2
        # Key 0 is visible to every row, so no row is ever all -inf (no NaN from exp2).
        qk = tl.where(offs_n[None, :] <= pos_r[:, None], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, INTERPRET)
        m_i = m_new
    out_ptrs = (
        out_ptr
        + batch * stride_ob
        + (start + pos_r)[:, None] * stride_os
        + (hkv * GROUP + head_r)[:, None] * stride_oh
        + offs_dv[None, :]
    )
    tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    lse2 = m_i + tl.log2(l_i)

    # Loop 2: per-block maxima of the final probabilities, group max, unnormalised.
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < length
    own_block_r = pos_r // BLOCK_SIZE
    bm_rows = bm_ptr + batch * stride_bb + hkv * stride_bh + (start + offs_m) * stride_bs
    denom = tl.zeros([BLOCK_M], dtype=tl.float32)
    last_pos = kv_end - 1
    for j in range(0, last_pos // BLOCK_SIZE):
        offs_n = j * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :])
        block_logit = tl.max(dot(q, tl.trans(k), INTERPRET), axis=1) * sm_scale_log2
        p = tl.where(row_ok & (j < own_block_r), tl.exp2(block_logit - lse2), 0.0)
        p_group = tl.max(tl.reshape(p, [BLOCK_M, GROUP_PAD]), axis=1)
        denom += p_group
        tl.store(bm_rows + j, p_group, mask=m_ok)

    # Loop 3: renormalise; blocks at or past the row's own block become 0.
    tl.debug_barrier()
    own_block_m = offs_m // BLOCK_SIZE
    inv = tl.where(denom > 0, 1.0 / tl.maximum(denom, 1e-30), 0.0)
    for j0 in range(0, nblk, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        seen = m_ok[:, None] & (offs_j[None, :] < own_block_m[:, None])
        ptrs = bm_rows[:, None] + offs_j[None, :]
        val = tl.load(ptrs, mask=seen, other=0.0)
        tl.store(ptrs, val * inv[:, None], mask=m_ok[:, None] & (offs_j[None, :] < nblk))


def _launch_params(group: int, head_dim: int, hip: bool = False) -> dict:
    """Tile sizes: about 128 stacked (position, head) rows per program. AMD's 64 KiB of LDS
    holds only one stage of the D=256 tiles (two need 66 KiB)."""
    group_pad = triton.next_power_of_2(group)
    block_m = max(16, 128 // group_pad)
    rows = block_m * group_pad
    return {
        "GROUP_PAD": group_pad,
        "BLOCK_M": block_m,
        "BLOCK_N": 64 if head_dim <= 128 else 32,
        "BLOCK_J": 64,
        "num_warps": 4 if rows <= 64 else 8,
        "num_stages": 1 if hip and head_dim > 128 else 2,
    }


def attn_block_max(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_size: int,
    sm_scale: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``attn_block_max``; arguments and results as in ``seerattn_r.ops.attn_block_max``
    (inputs already validated: last dims contiguous, D and Dv powers of two)."""
    batch, seqlen, hq, head_dim = q.shape
    hkv, head_dim_v = k.shape[2], v.shape[3]
    group = hq // hkv
    nblk = triton.cdiv(max_seqlen, block_size)
    # Packed tokens after the last boundary belong to no sequence and no program writes
    # them: zero-fill (as the reference does) only then, so the dense path skips a memset.
    alloc = torch.zeros if cu_seqlens is not None else torch.empty
    out = alloc(batch, seqlen, hq, head_dim_v, dtype=q.dtype, device=q.device)
    block_max = alloc(batch, hkv, seqlen, nblk, dtype=torch.float32, device=q.device)
    params = _launch_params(group, head_dim, is_hip())
    num_seqs = cu_seqlens.numel() - 1 if cu_seqlens is not None else batch
    grid = (triton.cdiv(max_seqlen, params["BLOCK_M"]), num_seqs, hkv)
    _attn_block_max_kernel[grid](
        q, k, v, out, block_max, cu_seqlens if cu_seqlens is not None else q,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        block_max.stride(0), block_max.stride(1), block_max.stride(2),
        seqlen, nblk, sm_scale * 1.4426950408889634,
        GROUP=group,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_SIZE=block_size,
        IS_VARLEN=cu_seqlens is not None,
        INTERPRET=interpreting(),
        **params,
    )
    return out, block_max


def aot_configs() -> list:
    """The builds ``tests/test_triton_aot.py`` compiles for NVIDIA and AMD: every dtype,
    head dims 64/128/256, groups 1 to 8 (3 is padded), every block size, packed or not."""
    from seerattn_r.kernels.triton._common import aot_config

    kernel = _attn_block_max_kernel
    ints = {a: "i32" for a in kernel.arg_names if a.startswith("stride_") or a in ("seqlen", "nblk")}
    cases = [  # dtype, D = Dv, group, block_size, packed (cu_seqlens)
        (torch.bfloat16, 128, 4, 64, False),  # Qwen3-4B/8B
        (torch.float16, 128, 8, 64, True),
        (torch.bfloat16, 64, 3, 64, True),  # SmolLM2
        (torch.bfloat16, 256, 2, 128, False),
        (torch.float16, 64, 1, 16, False),
        (torch.float32, 64, 4, 32, True),
    ]
    configs = []
    for dtype, d, group, bs, packed in cases:
        dt = "*" + TRITON_DTYPE[dtype]
        params = _launch_params(group, d)
        types = dict(ints, q_ptr=dt, k_ptr=dt, v_ptr=dt, out_ptr=dt, bm_ptr="*fp32", cu_ptr="*i32",
                     sm_scale_log2="fp32")
        constexprs = dict(GROUP=group, GROUP_PAD=params["GROUP_PAD"], HEAD_DIM=d, HEAD_DIM_V=d,
                          BLOCK_M=params["BLOCK_M"], BLOCK_N=params["BLOCK_N"], BLOCK_SIZE=bs,
                          BLOCK_J=params["BLOCK_J"], IS_VARLEN=packed, INTERPRET=False)
        configs.append(aot_config(
            f"attn_block_max-{TRITON_DTYPE[dtype]}-D{d}-g{group}-bs{bs}-packed{int(packed)}", kernel, types,
            constexprs, matrix_cores=dtype != torch.float32,
            hip_options=dict(num_stages=_launch_params(group, d, hip=True)["num_stages"]),
            num_warps=params["num_warps"], num_stages=params["num_stages"]))
    return configs
