"""The Triton gate kernels beyond the op-level property tests of ``test_ops.py``.

* ``gate_scores`` with every chunking of the blocks (the plan picks one from the SM count,
  so each chunk count is forced here): chunks past the scored blocks, a chunk count that
  does not divide Nblk, rows with 0, 1 or all blocks scored.
* ``select_blocks``' radix select on keys that share their high bytes (every pass decides),
  negative scores and signed zeros, long rows (2048 blocks = 128k tokens of 64) and ties.
* the fused ``gate_select``: equal, bit for bit, to ``select_blocks(gate_scores(...))`` of
  the Triton backend and to the reference selection of those probabilities, including
  blocks whose distinct logits round to equal probabilities.

On CPU these run under ``TRITON_INTERPRET=1``; the ``gpu``-marked copies on a GPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seerattn_r import reference
from tests.utils import assert_close, cpu_backends, gpu_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _devices():
    cases = [pytest.param("cpu", id="cpu")] if "triton" in cpu_backends() else []
    gpu_marks = [pytest.mark.gpu, pytest.mark.skipif("triton" not in gpu_backends(), reason="no GPU with Triton")]
    return cases + [pytest.param("cuda", id="cuda", marks=gpu_marks)]


DEVICES = _devices()


def _kernels():
    from seerattn_r.kernels.triton import gate_scores, gate_select, select_blocks

    return gate_scores, select_blocks, gate_select


@st.composite
def gate_rows(draw, device: str):
    """(batch, hkv, dg, nblk, num_blocks, chunks): chunk counts from 1 past the block count."""
    gpu = device == "cuda"
    batch = draw(st.integers(1, 4 if gpu else 2))
    hkv = draw(st.integers(1, 4 if gpu else 2))
    dg = draw(st.sampled_from([16, 96, 128] if gpu else [16, 48, 64]))  # 48, 96: Dg padded
    nblk = draw(st.integers(0, 700 if gpu else 90))
    nums = [draw(st.sampled_from([0, 1, nblk, draw(st.integers(0, nblk))])) for _ in range(batch)]
    chunks = draw(st.integers(1, 9))
    return batch, hkv, dg, nblk, nums, chunks


def _gate_inputs(device, batch, hkv, dg, nblk, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv, dg, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(batch, nblk, hkv, dg, generator=gen).to(device=device, dtype=dtype)
    return q, k


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_gate_scores_any_chunking(device, data, poison_empty):
    gate_scores, _, _ = _kernels()
    batch, hkv, dg, nblk, nums, chunks = data.draw(gate_rows(device))
    dtype = data.draw(st.sampled_from(DTYPES))
    q, k = _gate_inputs(device, batch, hkv, dg, nblk, dtype, data.draw(st.integers(0, 2**31 - 1)))
    num = torch.tensor(nums, dtype=torch.int32, device=device)
    out = gate_scores.gate_scores(q, k, num, dg**-0.5, chunks)
    ref = reference.gate_scores(q, k, num, dg**-0.5)
    assert_close("gate_scores", ref, out, 1e-4)
    unscored = torch.arange(nblk, device=device)[None, None, :] >= num[:, None, None]
    assert (out[unscored.expand_as(out)] == 0).all()


def test_plan_chunks_spreads_the_benchmark_shapes(monkeypatch):
    """On a 132-SM GPU: about PROGRAMS_PER_UNIT programs per SM, whole tiles per chunk, every
    block in exactly one chunk, and several chunks per row at batch 1."""
    from seerattn_r.kernels.triton import gate_scores

    monkeypatch.setattr(gate_scores, "compute_units", lambda device: 132)
    block_j = gate_scores.blocks_per_tile(128)
    for batch, nblk in ((1, 512), (16, 512), (1, 2048), (16, 2048), (3, 1), (64, 97)):
        rows = batch * 8
        chunks, chunk_blocks = gate_scores.plan_chunks(torch.device("cuda"), rows, nblk, block_j)
        assert chunk_blocks % block_j == 0
        assert (chunks - 1) * chunk_blocks < nblk <= chunks * chunk_blocks
        programs = rows * chunks
        tiles = math.ceil(nblk / block_j)
        assert programs >= min(rows * tiles, gate_scores.PROGRAMS_PER_UNIT * 132 // 2), (batch, nblk, chunks)
        assert programs <= max(rows, 2 * gate_scores.PROGRAMS_PER_UNIT * 132), (batch, nblk, chunks)


def _keys_sharing_high_bytes(gen, shape):
    """Scores whose fp32 bit patterns agree in the high bytes and differ below, with
    repeats: each radix pass has to split ties of the previous one."""
    base = torch.tensor([0.015625, 0.0157], dtype=torch.float32).view(torch.int32)
    low = torch.randint(0, 4, shape, generator=gen, dtype=torch.int32) * 0x10101
    pick = torch.randint(0, 2, shape, generator=gen)
    return (base[pick] + low).view(torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_select_blocks_radix(device, data, poison_empty):
    _, select_blocks, _ = _kernels()
    draw = data.draw
    gpu = device == "cuda"
    batch, hkv = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    nblk = draw(st.sampled_from([0, 1, 2, 255, 256, 257, draw(st.integers(0, 2100 if gpu else 600))]))
    bs = draw(st.sampled_from([16, 64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["shared-high-bytes", "signed", "levels", "continuous"]))
    shape = (batch, hkv, nblk)
    if kind == "shared-high-bytes":
        scores = _keys_sharing_high_bytes(gen, shape)
    elif kind == "signed":  # -0.0 and +0.0 are equal, negatives order below them
        scores = torch.tensor([-0.0, 0.0, -1.5, 2.0, -3e-30, 1e-37])[torch.randint(0, 6, shape, generator=gen)]
    elif kind == "levels":
        scores = torch.randint(0, 5, shape, generator=gen).float() / 5
    else:
        scores = torch.rand(shape, generator=gen)
    nums = [draw(st.sampled_from([0, 1, nblk, draw(st.integers(0, nblk))])) for _ in range(batch)]
    lens = [draw(st.sampled_from([0, n * bs + 1, (n + 1) * bs, draw(st.integers(0, (nblk + 2) * bs))])) for n in nums]
    budget = draw(st.sampled_from([0, bs, nblk * bs, (nblk + 5) * bs, draw(st.integers(0, (nblk + 3) * bs))]))
    sink = draw(st.booleans())
    scores = scores.to(device)
    num = torch.tensor(nums, dtype=torch.int32, device=device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = select_blocks.select_blocks(scores, num, seqlens, bs, budget, None, sink)
    ref = reference.select_blocks(scores, num, seqlens, bs, budget, None, sink)
    assert torch.equal(out.cpu(), ref.cpu()), f"{kind}: selection differs:\n{out}\nvs reference\n{ref}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nblk", [2047, 2048])
def test_select_blocks_128k_tokens(device, nblk, poison_empty):
    """The benchmark's long rows (128k tokens of 64) at 90% sparsity, with repeated scores."""
    _, select_blocks, _ = _kernels()
    gen = torch.Generator().manual_seed(nblk)
    scores = (torch.randint(0, 300, (2, 2, nblk), generator=gen).float() / 300).to(device)
    num = torch.tensor([nblk - 1, 1000], dtype=torch.int32, device=device)
    seqlens = torch.tensor([nblk * 64, 1000 * 64 + 5], dtype=torch.int32, device=device)
    budget = round(0.1 * nblk) * 64
    out = select_blocks.select_blocks(scores, num, seqlens, 64, budget, None, True)
    ref = reference.select_blocks(scores, num, seqlens, 64, budget, None, True)
    assert torch.equal(out.cpu(), ref.cpu())


@pytest.mark.parametrize("device", DEVICES)
@given(data=st.data())
def test_gate_select_matches_scores_then_select(device, data, poison_empty):
    gate_scores, select_blocks, gate_select = _kernels()
    draw = data.draw
    batch, hkv, dg, nblk, nums, chunks = draw(gate_rows(device))
    dtype = draw(st.sampled_from(DTYPES))
    q, k = _gate_inputs(device, batch, hkv, dg, nblk, dtype, draw(st.integers(0, 2**31 - 1)))
    if nblk >= 4 and draw(st.booleans()):
        # Equal logits: copies of a few blocks' keys (ties must go to the lower id).
        src = torch.randint(0, 3, (nblk,), generator=torch.Generator().manual_seed(nblk))
        k = k[:, src.to(device)].contiguous()
    bs = draw(st.sampled_from([16, 64]))
    lens = torch.tensor([n * bs + draw(st.integers(1, bs)) for n in nums], dtype=torch.int32, device=device)
    num = torch.tensor(nums, dtype=torch.int32, device=device)
    sink = draw(st.booleans())
    if draw(st.booleans()):
        budget, threshold = draw(st.sampled_from([0, bs, 7 * bs, (nblk + 1) * bs])), None
    else:
        budget, threshold = None, draw(st.sampled_from([0.0, 2e-3, 0.05]))
    scale = dg**-0.5
    fused = gate_select.gate_select(q, k, num, lens, bs, budget, threshold, sink, scale, chunks)
    probs = gate_scores.gate_scores(q, k, num, scale, chunks)
    split = select_blocks.select_blocks(probs, num, lens, bs, budget, threshold, sink)
    ref = reference.select_blocks(probs, num, lens, bs, budget, threshold, sink)
    assert torch.equal(fused.cpu(), split.cpu()), f"fused:\n{fused}\nvs scores then select\n{split}"
    assert torch.equal(fused.cpu(), ref.cpu()), f"fused:\n{fused}\nvs reference selection\n{ref}"


@pytest.mark.parametrize("device", DEVICES)
def test_gate_select_follows_probabilities_not_logits(device, poison_empty):
    """Logits -150 .. -300 below the max differ, their fp32 probabilities do not (all
    underflow to 0): among them the lower ids win, as in select_blocks of the
    probabilities, not the larger logits."""
    gate_scores, _, gate_select = _kernels()
    dg, nblk = 16, 8
    logits = torch.tensor([0.0, -200.0, -300.0, -250.0, -150.0, -160.0, -170.0, -180.0])
    q = torch.zeros(1, 1, dg)
    q[..., 0] = 1.0
    k = torch.zeros(1, nblk, 1, dg)
    k[0, :, 0, 0] = logits * math.sqrt(dg)
    q, k = q.to(device), k.to(device)
    num = torch.tensor([nblk], dtype=torch.int32, device=device)
    lens = torch.tensor([nblk * 16 + 1], dtype=torch.int32, device=device)
    probs = gate_scores.gate_scores(q, k, num, dg**-0.5, 2)
    assert (probs[0, 0, 1:] == 0).all() and probs[0, 0, 0] == 1  # the premise
    out = gate_select.gate_select(q, k, num, lens, 16, 3 * 16, None, False, dg**-0.5, 2)
    assert out.cpu().tolist() == [[[0, 1, 2, 8, -1]]]  # not 0, 4, 5 by logit; then the last block


@pytest.mark.bench_smoke
@pytest.mark.skipif("triton" not in cpu_backends(), reason="needs TRITON_INTERPRET=1")
def test_bench_gate_kernels_smoke(tmp_path):
    """benchmarks/bench_gate_kernels.py on one toy point: it runs, checks and records."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gate_kernels.py"
    out = tmp_path / "gate_kernels.json"
    proc = subprocess.run([sys.executable, str(script), "--batch", "2", "--tokens", "1000", "--hkv", "2",
                           "--gate-dim", "32", "--programs-per-unit", "1,4", "--no-graph", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    assert all(r["select_equal"] and r["fused_equal"] and r["scores_relerr"] < 1e-4 for r in rows)
    assert all(r["fused_ms"] > 0 for r in rows)
