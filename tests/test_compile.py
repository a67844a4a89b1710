"""torch.library conformance (opcheck) and torch.compile of the decode pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from seerattn_r import ops


def _decode_inputs(batch=2, hkv=2, group=4, d=64, dg=32, bs=16, smax=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * group, d, generator=gen)
    k = torch.randn(batch, smax, hkv, d, generator=gen)
    v = torch.randn(batch, smax, hkv, d, generator=gen)
    qg = torch.randn(batch, hkv, dg, generator=gen)
    kg = torch.randn(batch, math.ceil(smax / bs), hkv, dg, generator=gen)
    return q, k, v, qg, kg


def test_opcheck_every_op():
    q, k, v, qg, kg = _decode_inputs()
    lens = torch.tensor([128, 70], dtype=torch.int32)
    offs = torch.tensor([0, 40], dtype=torch.int32)
    num = ((lens - 1) // 16).to(torch.int32)
    scores = ops.gate_scores(qg, kg, num)
    idx = ops.select_blocks(scores, num, lens, 16, token_budget=48)
    cases = [
        (torch.ops.seerattn.sparse_decode.default, (q, k, v, lens, idx, 16, None, offs)),
        (torch.ops.seerattn.sparse_decode.default, (q.half(), k.half(), v.half(), lens, idx, 16, 0.2, None)),
        (torch.ops.seerattn.kpool.default, (k, lens, 16, offs)),
        (torch.ops.seerattn.gate_scores.default, (qg, kg, num, None)),
        (torch.ops.seerattn.select_blocks.default, (scores, num, lens, 16, 48, None, True)),
        (torch.ops.seerattn.select_blocks.default, (scores, num, lens, 16, None, 0.1, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _step(q, k, v, qg, kg, lens):
    num = (lens - 1) // 16
    scores = ops.gate_scores(qg, kg, num)
    idx = ops.select_blocks(scores, num, lens, 16, token_budget=48)
    return ops.sparse_decode(q, k, v, lens, idx, 16)


def test_compile_fullgraph_no_recompile_on_new_lengths():
    torch._dynamo.reset()
    q, k, v, qg, kg = _decode_inputs()
    compiled = torch.compile(_step, fullgraph=True, dynamic=False)
    for n, lens in enumerate(([128, 70], [100, 33], [17, 128], [1, 64])):
        lens = torch.tensor(lens, dtype=torch.int32)
        with torch._dynamo.config.patch(error_on_recompile=n > 0):
            out = compiled(q, k, v, qg, kg, lens)
        torch.testing.assert_close(out, _step(q, k, v, qg, kg, lens), rtol=1e-5, atol=1e-6)


def test_compile_accepts_strided_cache_view():
    torch._dynamo.reset()
    q, k, v, qg, kg = _decode_inputs()
    k_bhsd, v_bhsd = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    lens = torch.tensor([128, 70], dtype=torch.int32)
    compiled = torch.compile(_step, fullgraph=True)
    out = compiled(q, k_bhsd.transpose(1, 2), v_bhsd.transpose(1, 2), qg, kg, lens)
    torch.testing.assert_close(out, _step(q, k, v, qg, kg, lens), rtol=1e-5, atol=1e-6)
