"""Every backend of every op against the pure-PyTorch reference.

Property tests draw shapes and contents (ragged lengths, partial and too-short blocks,
left-padding offsets, indices in random order with -1 padding, duplicates and blocks past
the valid range, rows with no valid block, per-KV-head and per-query-head selections).
K/V entries outside each row's valid tokens hold huge values, so a kernel that reads them
shows. Outputs are NaN-poisoned (``poison_empty``). On CPU the Triton kernels run under
``TRITON_INTERPRET=1``; the ``gpu``-marked copies run every GPU backend.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seerattn_r import ops, reference
from seerattn_r.backend import use_backend
from tests.utils import RTOL, assert_close, cpu_backends, gpu_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HUGE = 1.0e4  # fits fp16; one such key dominates any softmax it leaks into


def _params(cpu: list[str], gpu: list[str]):
    """(device, backend) pairs: CPU ones plain, CUDA ones marked ``gpu``."""
    cases = [pytest.param("cpu", b, id=f"cpu-{b}") for b in cpu]
    gpu_mark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")]
    names = gpu or ["triton", "tilelang"]
    cases += [pytest.param("cuda", b, id=f"cuda-{b}", marks=gpu_mark) for b in names]
    return cases


BACKENDS = _params(cpu_backends(), gpu_backends())


def _skip_unavailable(device: str, name: str) -> None:
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no GPU")
        if name not in gpu_backends():
            pytest.skip(f"{name} is not available on this GPU")


@st.composite
def rows(draw, device: str, max_blocks: int):
    """Batch geometry: block size, cache length, ragged lengths and left-padding offsets."""
    gpu = device == "cuda"
    batch = draw(st.integers(1, 8 if gpu else 3))
    bs = draw(st.sampled_from([16, 32, 64, 128]))
    nblk_cache = draw(st.integers(1, max_blocks))
    smax = nblk_cache * bs - draw(st.integers(0, bs - 1))  # cache length not a block multiple
    seqlens, offsets = [], []
    for _ in range(batch):
        kind = draw(st.sampled_from(["full", "ragged", "short", "empty"]))
        n = {"full": smax, "ragged": draw(st.integers(0, smax)),
             "short": draw(st.integers(1, min(bs - 1, smax))), "empty": 0}[kind]
        seqlens.append(n)
        offsets.append(draw(st.integers(0, smax - n)))
    with_offsets = draw(st.booleans())
    return bs, smax, seqlens, offsets if with_offsets else None


def _masked_cache(batch, smax, hkv, d, seqlens, offsets, dtype, device, gen):
    """Random K or V with HUGE values at every position outside the valid tokens."""
    x = torch.randn(batch, smax, hkv, d, generator=gen)
    for b in range(batch):
        off = 0 if offsets is None else offsets[b]
        x[b, :off] = HUGE
        x[b, off + seqlens[b]:] = HUGE
    return x.to(device=device, dtype=dtype)


def _indices(draw, batch, heads, nblk_valid, device):
    """[B, heads, M] int32: random order, -1 padding, duplicates, out-of-range ids, and
    sometimes a row/head with nothing valid at all."""
    m = draw(st.integers(1, 10))
    hi = max(nblk_valid) + 2
    flat = draw(st.lists(st.integers(-1, hi), min_size=batch * heads * m, max_size=batch * heads * m))
    idx = torch.tensor(flat, dtype=torch.int32).view(batch, heads, m)
    if draw(st.booleans()):
        idx[draw(st.integers(0, batch - 1)), draw(st.integers(0, heads - 1))] = -1
    return idx.to(device)


@pytest.mark.parametrize(("device", "name"), BACKENDS)
@given(data=st.data())
def test_sparse_decode(device, name, data, poison_empty):
    _skip_unavailable(device, name)
    draw = data.draw
    gpu = device == "cuda"
    bs, smax, seqlens, offsets = draw(rows(device, max_blocks=24 if gpu else 5))
    batch = len(seqlens)
    hkv = draw(st.integers(1, 8 if gpu else 2))
    group = draw(st.sampled_from([1, 2, 3, 4, 5, 8, 16] if gpu else [1, 2, 3, 5, 16]))
    d = draw(st.sampled_from([64, 128, 256] if gpu else [64, 64, 128]))
    dv = draw(st.sampled_from([d, d, 64, 128]))
    dtype = draw(st.sampled_from(DTYPES))
    per_query_head = draw(st.booleans())
    hq = hkv * group
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    q = torch.randn(batch, hq, d, generator=gen).to(device=device, dtype=dtype)
    k = _masked_cache(batch, smax, hkv, d, seqlens, offsets, dtype, device, gen)
    v = _masked_cache(batch, smax, hkv, dv, seqlens, offsets, dtype, device, gen)
    if draw(st.booleans()):  # transformers' [B, H, S, D] cache, passed as a strided view
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    nblk_valid = [math.ceil(n / bs) for n in seqlens]
    idx = _indices(draw, batch, hq if per_query_head else hkv, nblk_valid, device)
    lens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    offs = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=device)
    scale = draw(st.sampled_from([None, 0.3]))

    with use_backend(name):
        out, lse = ops.sparse_decode(q, k, v, lens, idx, bs, scale, offs, return_lse=True)
    up = [t.float() for t in (q, k, v)]
    sm = 1.0 / math.sqrt(d) if scale is None else scale
    ref_out, ref_lse = reference.sparse_decode(*up, lens, idx, bs, sm, offs)

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close("out", ref_out, out.float(), RTOL[dtype])
    assert_close("lse", ref_lse, lse, 1e-5 if dtype == torch.float32 else 1e-3)
    empty = torch.isinf(ref_lse)
    assert (out[empty] == 0).all(), "heads with no valid block must return zeros"


@pytest.mark.parametrize(("device", "name"), BACKENDS)
@given(data=st.data())
def test_kpool(device, name, data, poison_empty):
    _skip_unavailable(device, name)
    draw = data.draw
    bs, s, seqlens, offsets = draw(rows(device, max_blocks=6))
    batch = len(seqlens)
    hkv = draw(st.integers(1, 4))
    d = draw(st.sampled_from([64, 128]))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    k = _masked_cache(batch, s, hkv, d, seqlens, offsets, dtype, device, gen)
    lens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    offs = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=device)

    with use_backend(name):
        out = ops.kpool(k, lens, bs, offs)
    ref = reference.kpool(k.float(), lens, bs, offs)
    assert out.dtype == dtype
    assert_close("kpool", ref, out.float(), RTOL[dtype])
    # max and min are exact picks of stored values
    torch.testing.assert_close(out[..., : 2 * d], ref[..., : 2 * d].to(dtype), rtol=0, atol=0)


@st.composite
def gate_inputs(draw, device, min_blocks=1):
    batch = draw(st.integers(1, 4))
    hkv = draw(st.integers(1, 4))
    dg = draw(st.sampled_from([32, 64, 128]))
    nblk = draw(st.integers(min_blocks, 300 if device == "cuda" else 40))
    nums = draw(st.lists(st.integers(0, nblk), min_size=batch, max_size=batch))
    return batch, hkv, dg, nblk, nums


@pytest.mark.parametrize(("device", "name"), BACKENDS)
@given(data=st.data())
def test_gate_scores(device, name, data, poison_empty):
    _skip_unavailable(device, name)
    batch, hkv, dg, nblk, nums = data.draw(gate_inputs(device))
    dtype = data.draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    qg = torch.randn(batch, hkv, dg, generator=gen).to(device=device, dtype=dtype)
    kg = torch.randn(batch, nblk, hkv, dg, generator=gen).to(device=device, dtype=dtype)
    num = torch.tensor(nums, dtype=torch.int32, device=device)
    with use_backend(name):
        out = ops.gate_scores(qg, kg, num)
    ref = reference.gate_scores(qg, kg, num, 1.0 / math.sqrt(dg))
    assert out.dtype == torch.float32
    assert_close("gate_scores", ref, out, 1e-4)
    j = torch.arange(nblk, device=device)
    assert (out[(j[None, :] >= num[:, None])[:, None, :].expand_as(out)] == 0).all()


@pytest.mark.parametrize(("device", "name"), BACKENDS)
@given(data=st.data())
def test_select_blocks(device, name, data, poison_empty):
    _skip_unavailable(device, name)
    draw = data.draw
    batch, hkv, _, nblk, nums = draw(gate_inputs(device, min_blocks=0))
    bs = draw(st.sampled_from([16, 32, 64, 128]))
    # Lengths whose last block is anywhere: before, at, or past the scored range.
    seqlens = [draw(st.integers(0, (nblk + 2) * bs)) for _ in range(batch)]
    # Few distinct values so ties are common: ties must go to the lower block id.
    levels = draw(st.integers(1, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = (torch.randint(0, levels, (batch, hkv, nblk), generator=gen).float() / levels).to(device)
    num = torch.tensor(nums, dtype=torch.int32, device=device)
    lens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    sink = draw(st.booleans())
    if draw(st.booleans()):
        kw = dict(token_budget=draw(st.integers(0, (nblk + 3) * bs)))
    else:
        kw = dict(threshold=draw(st.sampled_from([0.0, 0.2, 0.5, 0.99])))
    with use_backend(name):
        out = ops.select_blocks(scores, num, lens, bs, sink_block=sink, **kw)
    ref = reference.select_blocks(scores, num, lens, bs, kw.get("token_budget"), kw.get("threshold"), sink)
    assert out.dtype == torch.int32
    assert torch.equal(out.cpu(), ref.cpu()), f"selection differs:\n{out}\nvs reference\n{ref}"


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_triton_sparse_decode_many_splits(splits, monkeypatch, poison_empty):
    """The split-K path and its combine, whatever the plan picks on this machine."""
    if "triton" not in cpu_backends() + gpu_backends():
        pytest.skip("Triton runs here only on a GPU or under TRITON_INTERPRET=1")
    from seerattn_r.kernels.triton import sparse_decode as triton_sparse_decode

    monkeypatch.setattr(triton_sparse_decode, "plan_splits", lambda *args: splits)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(splits)
    batch, hkv, group, d, bs, smax = 2, 2, 4, 64, 16, 150
    q = torch.randn(batch, hkv * group, d, generator=gen).to(device)
    lens, offs = [150, 61], [0, 70]
    k = _masked_cache(batch, smax, hkv, d, lens, offs, torch.float32, device, gen)
    v = _masked_cache(batch, smax, hkv, d, lens, offs, torch.float32, device, gen)
    idx = torch.tensor([[[9, 3, -1, 0, 3, 7, 12, 1], [-1, -1, -1, -1, -1, -1, -1, -1]],
                        [[3, 2, 0, 1, 4, 9, -1, 2], [1, 1, 1, 1, 1, 1, 1, 1]]], dtype=torch.int32, device=device)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    offs_t = torch.tensor(offs, dtype=torch.int32, device=device)
    with use_backend("triton"):
        out, lse = ops.sparse_decode(q, k, v, lens_t, idx, bs, None, offs_t, return_lse=True)
    ref_out, ref_lse = reference.sparse_decode(q, k, v, lens_t, idx, bs, d**-0.5, offs_t)
    assert_close("out", ref_out, out, RTOL[torch.float32])
    assert_close("lse", ref_lse, lse, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "tilelang"])
def test_sparse_decode_graphs_replayed_concurrently(name):
    """Two CUDA graphs of split-K calls (each combines several splits in the launch, with
    counters the call keeps between launches), replayed 20 times interleaved on two streams,
    match the reference every time: captured calls do not share state."""
    _skip_unavailable("cuda", name)
    gen = torch.Generator().manual_seed(0)
    batch, hkv, group, d, bs, smax = 2, 4, 8, 128, 64, 8192

    def inputs():
        q = torch.randn(batch, hkv * group, d, generator=gen).half().cuda()
        k = torch.randn(batch, smax, hkv, d, generator=gen).half().cuda()
        v = torch.randn(batch, smax, hkv, d, generator=gen).half().cuda()
        idx = torch.rand(batch, hkv, smax // bs, generator=gen).topk(40, dim=-1).indices.int().cuda()
        lens = torch.tensor([smax, smax - 100], dtype=torch.int32).cuda()
        return q, k, v, lens, idx

    calls = [inputs(), inputs()]
    refs = [reference.sparse_decode(q, k, v, lens, idx, bs, d**-0.5, None)[0] for q, k, v, lens, idx in calls]
    graphs, outs = [], []
    with use_backend(name):
        for q, k, v, lens, idx in calls:
            ops.sparse_decode(q, k, v, lens, idx, bs)  # eager first, as a warm-up would
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs.append(ops.sparse_decode(q, k, v, lens, idx, bs))
            graphs.append(graph)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(20):
        for out in outs:
            out.fill_(float("nan"))
        for graph, stream in zip(graphs, streams):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                graph.replay()
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
        for ref, out in zip(refs, outs):
            assert_close("out", ref, out, RTOL[torch.float16])


# The reference itself, against a plain dense attention over explicitly gathered tokens.


@pytest.mark.parametrize("seed", range(6))
def test_reference_sparse_decode_matches_dense_gather(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, hkv, group, d, bs, smax = 3, 2, 3, 64, 16, 90
    hq = hkv * group
    q = torch.randn(batch, hq, d, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, smax, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(batch, smax, hkv, d, generator=gen, dtype=torch.float64)
    lens = torch.tensor([90, 41, 7], dtype=torch.int32)
    offs = torch.tensor([0, 30, 80], dtype=torch.int32)
    idx = torch.randint(-1, 7, (batch, hq, 5), generator=gen, dtype=torch.int32)
    out, lse = reference.sparse_decode(q, k, v, lens, idx, bs, 0.125, offs)
    for b in range(batch):
        for h in range(hq):
            blocks = {int(i) for i in idx[b, h] if i >= 0}
            toks = [t for t in range(int(lens[b])) if t // bs in blocks]
            if not toks:
                assert out[b, h].abs().max() == 0 and lse[b, h] == float("-inf")
                continue
            pos = torch.tensor(toks) + int(offs[b])
            s = (k[b, pos, h // group] @ q[b, h]) * 0.125
            p = torch.softmax(s, 0)
            want = (p[:, None] * v[b, pos, h // group]).sum(0)  # fp64; the reference works in fp32
            torch.testing.assert_close(out[b, h].double(), want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse[b, h].double(), torch.logsumexp(s, 0), rtol=1e-6, atol=1e-6)


def test_reference_select_blocks_by_hand():
    scores = torch.tensor([[[0.1, 0.4, 0.4, 0.05, 0.05, 0.0]]])
    num = torch.tensor([5], dtype=torch.int32)
    lens = torch.tensor([6 * 16], dtype=torch.int32)  # last = block 5
    out = reference.select_blocks(scores, num, lens, 16, 32, None, True)
    assert out.tolist() == [[[0, 1, 2, 5]]]  # top-2 {1, 2} (tie at 0.4 both in), sink 0, last 5
    out = reference.select_blocks(scores, num, lens, 16, 16, None, False)
    assert out.tolist() == [[[1, 5, -1]]]  # tie between 1 and 2 goes to the lower id
    out = reference.select_blocks(scores, num, lens, 16, None, 0.08, True)
    assert out.tolist() == [[[0, 1, 2, 5, -1, -1, -1, -1]]]
    empty = torch.tensor([0], dtype=torch.int32)
    out = reference.select_blocks(scores, torch.zeros_like(empty), empty, 16, 32, None, True)
    assert out.tolist() == [[[-1, -1, -1, -1]]]  # nothing scored and no forced block
