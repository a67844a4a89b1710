"""The public ``ops.gate_select`` op: same selection as ``gate_scores`` then
``select_blocks`` on every backend, the op rules (opcheck, fake impl) and its errors."""

from __future__ import annotations

import pytest
import torch

from seerattn_r import ops, use_backend
from tests.utils import cpu_backends, gpu_backends

CASES = [pytest.param("cpu", b, id=f"cpu-{b}") for b in ["torch", *cpu_backends()]] + [
    pytest.param("cuda", b, id=f"cuda-{b}", marks=[pytest.mark.gpu,
                 pytest.mark.skipif(not gpu_backends(), reason="no GPU")]) for b in (gpu_backends() or ["triton"])
]


def _inputs(device, batch=3, nblk=41, hkv=2, dg=32, bs=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv, dg, generator=gen).to(device)
    k = torch.randn(batch, nblk, hkv, dg, generator=gen).to(device)
    num = torch.tensor([0, 1, nblk][:batch], dtype=torch.int32, device=device)
    lens = (num * bs + torch.tensor([1, bs, 5][:batch], dtype=torch.int32, device=device)).int()
    return q, k, num, lens, bs


@pytest.mark.parametrize("device,name", CASES)
@pytest.mark.parametrize("mode", [dict(token_budget=80), dict(token_budget=0), dict(threshold=0.02)])
def test_same_selection_as_scores_then_select(device, name, mode):
    q, k, num, lens, bs = _inputs(device)
    with use_backend(name):
        fused = ops.gate_select(q, k, num, lens, bs, **mode, sm_scale=0.3)
        split = ops.select_blocks(ops.gate_scores(q, k, num, sm_scale=0.3), num, lens, bs, **mode)
    assert fused.dtype == torch.int32 and fused.shape == split.shape
    assert torch.equal(fused, split)


def test_opcheck():
    q, k, num, lens, bs = _inputs("cpu")
    torch.library.opcheck(torch.ops.seerattn.gate_select.default, (q, k, num, lens, bs, 64, None, True, None))


def test_compiles_without_graph_break():
    q, k, num, lens, bs = _inputs("cpu")
    fn = torch.compile(lambda *a: ops.gate_select(*a, token_budget=64), fullgraph=True, backend="aot_eager")
    with use_backend("torch"):
        assert torch.equal(fn(q, k, num, lens, bs), ops.gate_select(q, k, num, lens, bs, token_budget=64))


def test_errors_name_the_argument():
    q, k, num, lens, bs = _inputs("cpu")
    with pytest.raises(ValueError, match="exactly one of token_budget"):
        ops.gate_select(q, k, num, lens, bs)
    with pytest.raises(ValueError, match="k_gate"):
        ops.gate_select(q, k[:, :, :1], num, lens, bs, token_budget=64)
    with pytest.raises((ValueError, TypeError), match="cache_seqlens"):
        ops.gate_select(q, k, num, lens.long(), bs, token_budget=64)
