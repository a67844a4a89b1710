"""Block pooling of keys, ``[max | min | mean]`` per block and KV head, in Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import TRITON_DTYPE, AotConfig, aot_config

# Elements of one [tokens, D] tile held in registers at a time.
TILE_ELEMS = 4096


@triton.jit
def _kpool_kernel(
    k_ptr, seqlens_ptr, offsets_ptr, out_ptr,
    stride_kb, stride_ks, stride_kh,
    stride_ob, stride_on, stride_oh,
    D, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, D_PAD: tl.constexpr, HAS_OFFSETS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    seqlen = tl.load(seqlens_ptr + pid_b)
    if HAS_OFFSETS:
        start = tl.load(offsets_ptr + pid_b)
    else:
        start = 0
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < D
    tok0 = pid_n * BLOCK_SIZE
    base = k_ptr + pid_b.to(tl.int64) * stride_kb + pid_h.to(tl.int64) * stride_kh
    vmax = tl.full([D_PAD], float("-inf"), tl.float32)
    vmin = tl.full([D_PAD], float("inf"), tl.float32)
    vsum = tl.zeros([D_PAD], tl.float32)
    for t in range(0, BLOCK_SIZE, BLOCK_T):
        tok = tok0 + t + offs_t
        valid = tok < seqlen
        x = tl.load(base + (start + tok).to(tl.int64)[:, None] * stride_ks + offs_d[None, :],
                    mask=valid[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        vmax = tl.maximum(vmax, tl.max(tl.where(valid[:, None], x, float("-inf")), axis=0))
        vmin = tl.minimum(vmin, tl.min(tl.where(valid[:, None], x, float("inf")), axis=0))
        vsum += tl.sum(x, axis=0)
    count = tl.minimum(tl.maximum(seqlen - tok0, 0), BLOCK_SIZE)
    # A block with no valid token is all zeros (and must not divide by its zero count).
    nonempty = count > 0
    vmax = tl.where(nonempty, vmax, 0.0)
    vmin = tl.where(nonempty, vmin, 0.0)
    mean = vsum / tl.maximum(count, 1).to(tl.float32)
    out = out_ptr + pid_b.to(tl.int64) * stride_ob + pid_n.to(tl.int64) * stride_on + pid_h * stride_oh
    tl.store(out + offs_d, vmax, mask=d_mask)
    tl.store(out + D + offs_d, vmin, mask=d_mask)
    tl.store(out + 2 * D + offs_d, mean, mask=d_mask)


def _tokens_per_tile(block_size: int, d: int) -> int:
    return max(1, min(block_size, TILE_ELEMS // d))


def kpool(k, cache_seqlens, block_size, cache_offsets):
    """Pool each block of keys; inputs are validated.

    k [B, S, Hkv, D] (last dim contiguous) fp16/bf16/fp32; cache_seqlens [B] int32;
    cache_offsets [B] int32 or None. Returns [B, ceil(S/bs), Hkv, 3D] in k.dtype, blocks
    with no valid token all zeros, accumulated in fp32. Compiles once per dtype, D,
    block_size, next power of 2 of D and offsets/no offsets.
    """
    batch, s, hkv, d = k.shape
    nblk = triton.cdiv(s, block_size)
    d_pad = triton.next_power_of_2(d)
    out = torch.empty((batch, nblk, hkv, 3 * d), dtype=k.dtype, device=k.device)
    if out.numel() == 0:
        return out
    offsets = cache_offsets if cache_offsets is not None else cache_seqlens
    _kpool_kernel[(nblk, hkv, batch)](
        k, cache_seqlens, offsets, out,
        k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), d,
        BLOCK_SIZE=block_size, BLOCK_T=_tokens_per_tile(block_size, d_pad), D_PAD=d_pad,
        HAS_OFFSETS=cache_offsets is not None, num_warps=4,
    )
    return out


def aot_configs() -> list[AotConfig]:
    """AOT builds: each dtype, head dims 128 and 64, smallest and largest blocks, offsets."""
    ints = {a: "i32" for a in _kpool_kernel.arg_names if a.startswith("stride_") or a == "D"}
    configs = []
    for dtype, d, bs, offsets in ((torch.float16, 128, 64, True), (torch.bfloat16, 64, 16, False),
                                  (torch.float32, 128, 128, False)):
        dt = "*" + TRITON_DTYPE[dtype]
        d_pad = triton.next_power_of_2(d)
        configs.append(aot_config(
            f"kpool-{TRITON_DTYPE[dtype]}-D{d}-bs{bs}-off{int(offsets)}", _kpool_kernel,
            dict(ints, k_ptr=dt, seqlens_ptr="*i32", offsets_ptr="*i32", out_ptr=dt),
            dict(BLOCK_SIZE=bs, BLOCK_T=_tokens_per_tile(bs, d_pad), D_PAD=d_pad, HAS_OFFSETS=offsets),
            num_warps=4))
    return configs
