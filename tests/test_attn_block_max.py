"""``attn_block_max`` (the gates' training target) against its reference and its definition.

Property tests draw dense batches and ragged packed rows (``cu_seqlens``: empty, shorter
than a block and odd-length sequences, tokens after the last boundary holding HUGE
garbage that must never be read), GQA groups including non-powers of two, block sizes and
strided ``[B, H, S, D]`` views. Outputs are NaN-poisoned. On CPU the Triton kernel runs
under ``TRITON_INTERPRET=1`` at tiny shapes; the ``gpu`` copies use long sequences.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from seerattn_r.backend import use_backend
from seerattn_r.ops.attn_block_max import attn_block_max
from seerattn_r.reference.attn_block_max import attn_block_max as reference
from tests.utils import RTOL, assert_close, cpu_backends, gpu_backends

HUGE = 1.0e4
GPU_MARKS = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
BACKENDS = [pytest.param("cpu", b, id=f"cpu-{b}") for b in ["torch", *cpu_backends()]] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=GPU_MARKS) for b in (gpu_backends() or ["triton"])
]
GPU_CONFIGS = [  # (group, D, Dv, block size, dtype)
    (1, 64, 64, 16, torch.float32),
    (2, 128, 128, 64, torch.bfloat16),
    (3, 64, 128, 32, torch.float16),
    (4, 128, 128, 128, torch.float16),
    (8, 128, 64, 64, torch.bfloat16),
    (4, 256, 256, 64, torch.bfloat16),
    (8, 128, 128, 32, torch.float32),
]
# Interpreted programs are slow: fewer examples on CPU than the profile asks for on a GPU.
EXAMPLES = settings.default.max_examples if torch.cuda.is_available() else 10


def _brute_force(q, k, block_size, sm_scale):
    """The target of one sequence by its definition, one (position, block) at a time."""
    s, hq, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    nblk = math.ceil(s / block_size)
    target = torch.zeros(hkv, s, nblk, dtype=torch.float64)
    for h in range(hq):
        for t in range(s):
            p = torch.softmax(q[t, h].double() @ k[: t + 1, h // group].double().T * sm_scale, -1)
            for j in range(t // block_size):
                blk = p[j * block_size : (j + 1) * block_size].max()
                target[h // group, t, j] = max(target[h // group, t, j], blk)
    total = target.sum(-1, keepdim=True)
    return torch.where(total > 0, target / total.clamp_min(1e-300), 0.0)


def test_reference_matches_definition():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(70, 6, 64, generator=gen)
    k = torch.randn(70, 2, 64, generator=gen)
    v = torch.randn(70, 2, 64, generator=gen)
    out, bm = reference(q[None], k[None], v[None], 16, 0.2, None, 70)
    assert_close("block_max", _brute_force(q, k, 16, 0.2).float(), bm[0], 1e-5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True, scale=0.2, enable_gqa=True,
    )
    assert_close("out", sdpa[0].transpose(0, 1), out[0], 1e-5)
    assert torch.all(bm[0, :, :16] == 0), "positions in block 0 have no earlier block"
    torch.testing.assert_close(bm[0, :, 16:].sum(-1), torch.ones(2, 54))


@st.composite
def layouts(draw, gpu: bool):
    """(batch, S, cu_seqlens list or None, max_seqlen)."""
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, 600 if gpu else 80), min_size=1, max_size=5))
        tail = draw(st.integers(0, 20))
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        seqlen = max(cu[-1] + tail, 1)
        return 1, seqlen, cu, max(max(lengths), 1)
    return draw(st.integers(1, 3)), draw(st.integers(1, 2000 if gpu else 90)), None, None


@pytest.mark.parametrize(("device", "name"), BACKENDS)
@settings(max_examples=EXAMPLES)
@given(data=st.data())
def test_attn_block_max(device, name, data, poison_empty):
    if device == "cuda" and name not in gpu_backends():
        pytest.skip(f"{name} is not available on this GPU")
    draw = data.draw
    gpu = device == "cuda"
    batch, seqlen, cu, max_seqlen = draw(layouts(gpu))
    hkv = draw(st.integers(1, 8 if gpu else 2))
    if gpu:
        # Each (group, D, Dv, block size, dtype) is a kernel compile of several seconds: a
        # fixed set that covers every value of every axis keeps the compiles bounded.
        group, d, dv, bs, dtype = draw(st.sampled_from(GPU_CONFIGS))
    else:
        group = draw(st.sampled_from([1, 2, 3, 4]))
        d = dv = 64
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
        bs = draw(st.sampled_from([16, 32]))
    scale = draw(st.sampled_from([None, 0.05]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def make(heads, dim):
        x = torch.randn(batch, seqlen, heads, dim, generator=gen)
        if cu is not None:
            x[:, cu[-1]:] = HUGE  # belongs to no sequence: must never be read
        x = x.to(device=device, dtype=dtype)
        if draw(st.booleans()):  # transformers' [B, H, S, D] layout, as a strided view
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x

    q, k, v = make(hkv * group, d), make(hkv, d), make(hkv, dv)
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
    with use_backend(name):
        out, bm = attn_block_max(q, k, v, bs, scale, cu_t, max_seqlen)
    sm = 1 / math.sqrt(d) if scale is None else scale
    ref_out, ref_bm = reference(q.float(), k.float(), v.float(), bs, sm, cu_t, max_seqlen or seqlen)

    assert out.dtype == dtype and bm.dtype == torch.float32
    assert bm.shape == (batch, hkv, seqlen, math.ceil((max_seqlen or seqlen) / bs))
    assert_close("out", ref_out, out.float(), RTOL[dtype])
    # The target comes from fp32 logits of the same inputs in every dtype: tight everywhere.
    assert_close("block_max", ref_bm, bm, 1e-4)


def test_validation():
    q = torch.randn(1, 40, 4, 64)
    k = torch.randn(1, 40, 2, 64)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attn_block_max(q.numpy(), k, k, 16)
    with pytest.raises(ValueError, match="multiple of k's Hkv"):
        attn_block_max(torch.randn(1, 40, 3, 64), k, k, 16)
    with pytest.raises(ValueError, match="block_size"):
        attn_block_max(q, k, k, 24)
    with pytest.raises(TypeError, match="k must have the dtype of q"):
        attn_block_max(q, k.half(), k, 16)
    with pytest.raises(ValueError, match="head dim D"):
        attn_block_max(q[..., :48], k[..., :48], k[..., :48], 16)
    with pytest.raises(ValueError, match="k must be contiguous in its last dimension"):
        attn_block_max(q, k.transpose(1, 3).contiguous().transpose(1, 3), k, 16)
    with pytest.raises(TypeError, match="cu_seqlens must have dtype int32"):
        attn_block_max(q, k, k, 16, cu_seqlens=torch.tensor([0, 40]))
    with pytest.raises(ValueError, match="batch size 1"):
        attn_block_max(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), 16,
                       cu_seqlens=torch.tensor([0, 40], dtype=torch.int32))
    with pytest.raises(ValueError, match="max_seqlen must be in"):
        attn_block_max(q, k, k, 16, max_seqlen=41)


def test_opcheck():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 50, 4, 64, generator=gen)
    k = torch.randn(1, 50, 2, 64, generator=gen)
    cu = torch.tensor([0, 20, 47], dtype=torch.int32)
    with use_backend("torch"):
        torch.library.opcheck(torch.ops.seerattn.attn_block_max.default, (q, k, k, 16, 0.125, cu, 27))
