"""The fused gate ops (``gate_project_q``, ``gate_keys``, ``gate_cache_append``) against
their references, the gate's torch path, and each other.

Property tests draw odd head and gate dims (masked tiles), ragged left-padded rows,
partial and empty blocks, long positions and RoPE scaling; outputs are NaN-poisoned. On
CPU the Triton kernels run under ``TRITON_INTERPRET=1``; ``gpu``-marked copies run on a GPU.
The prefill/decode invariant (prefill N then append M == prefill N+M) is checked bit for
bit on each backend's fused path.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from seerattn_r import ops
from seerattn_r.backend import use_backend
from seerattn_r.cache import DecodePlan, GateCache
from seerattn_r.gate import AttnGate, GateRotary
from seerattn_r.reference import gate_cache as ref_cache
from seerattn_r.reference.gate_project_q import gate_project_q as ref_project_q
from tests.utils import RTOL, assert_close, cpu_backends, gpu_backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Every op path: each backend under test plus the torch reference through the op layer.
CASES = [pytest.param("cpu", b, id=f"cpu-{b}") for b in ["torch", *cpu_backends()]]
CASES += [pytest.param("cuda", b, id=f"cuda-{b}", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU")]) for b in (gpu_backends() or ["triton"])]


def _params(draw, hkv, k_in, dg, dtype, device, gen):
    """Random gate weights ``[Hkv, k_in, Dg]``, norm weight, frequencies, RoPE scaling."""
    weight = (torch.randn(hkv, k_in, dg, generator=gen) * k_in ** -0.5).to(device=device, dtype=dtype)
    norm = (torch.rand(dg, generator=gen) + 0.5).to(device=device, dtype=dtype)
    theta = draw(st.sampled_from([1e4, 1e6]))
    inv_freq = GateRotary.default(dg, theta).inv_freq.to(device)
    return weight, norm, inv_freq, draw(st.sampled_from([1.0, 1.2]))


@pytest.mark.parametrize(("device", "name"), CASES)
@given(data=st.data())
def test_gate_project_q(device, name, data, poison_empty):
    draw = data.draw
    batch, hkv, group = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3, 8]))
    # D and Dg are constexprs of the kernels: few values, odd ones to exercise the masks.
    d = draw(st.sampled_from([48, 64]))
    dg = draw(st.sampled_from([24, 32, 128]))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(batch, hkv * group, d, generator=gen).to(device=device, dtype=dtype)
    if draw(st.booleans()):  # a [B, T, Hq, D] capture's last token: a strided view
        q = torch.randn(batch, 3, hkv * group, d, generator=gen).to(device=device, dtype=dtype)[:, -1]
    weight, norm, inv_freq, scaling = _params(draw, hkv, group * d, dg, dtype, device, gen)
    weight = weight.view(hkv, group, d, dg)
    positions = torch.randint(0, 100_000, (batch,), generator=gen).to(device)
    if draw(st.booleans()):
        positions = positions.int()
    with use_backend(name):
        out = ops.gate_project_q(q, weight, norm, inv_freq, positions, scaling)
    ref = ref_project_q(q.float(), weight.float(), norm.float(), inv_freq, positions, scaling, 1e-6)
    assert out.dtype == dtype and out.shape == (batch, hkv, dg)
    assert_close("q_gate", ref, out.float(), RTOL[dtype])


@st.composite
def prompts(draw):
    """(block_size, S, seqlens, offsets or None): ragged, short, empty and full rows."""
    bs = draw(st.sampled_from([16, 32]))
    s = draw(st.integers(1, 3 * bs))
    seqlens, offsets = [], []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.sampled_from([s, 0, draw(st.integers(0, s))]))
        seqlens.append(n)
        offsets.append(draw(st.integers(0, s - n)))
    return bs, s, seqlens, offsets if draw(st.booleans()) else None


@pytest.mark.parametrize(("device", "name"), CASES)
@given(data=st.data())
def test_gate_keys(device, name, data, poison_empty):
    draw = data.draw
    bs, s, seqlens, offsets = draw(prompts())
    batch, hkv = len(seqlens), draw(st.integers(1, 2))
    d, dg = draw(st.sampled_from([48, 64])), draw(st.sampled_from([24, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    k = torch.randn(batch, s, hkv, d, generator=gen).to(device=device, dtype=dtype)
    weight, norm, inv_freq, scaling = _params(draw, hkv, 3 * d, dg, dtype, device, gen)
    lens = torch.tensor(seqlens, dtype=torch.int32, device=device)
    offs = None if offsets is None else torch.tensor(offsets, dtype=torch.int32, device=device)
    with use_backend(name):
        out = ops.gate_keys(k, lens, bs, weight, norm, inv_freq, scaling, cache_offsets=offs)
    ref = ref_cache.gate_keys(k, lens, bs, weight, norm, inv_freq, scaling, 1e-6, offs)
    assert out.dtype == dtype and out.shape == (batch, -(-s // bs), hkv, dg)
    assert_close("gate_keys", ref.float(), out.float(), RTOL[dtype])


@pytest.mark.parametrize(("device", "name"), CASES)
@given(data=st.data())
def test_gate_cache_append(device, name, data, poison_empty):
    """Every row's key lands in its slot; only completing rows (with the entry inside the
    cache) get an entry, and it is the reference's; nothing else changes."""
    draw = data.draw
    bs = draw(st.sampled_from([16, 32]))
    batch, hkv, cap = draw(st.integers(1, 4)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    d, dg = draw(st.sampled_from([48, 64])), draw(st.sampled_from([24, 64]))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    # Positions at block ends (completing), elsewhere, and completing past the capacity.
    ends = [draw(st.integers(0, cap)) * bs + bs - 1 for _ in range(batch)]
    pos = [p if draw(st.booleans()) else p - draw(st.integers(1, bs - 1)) for p in ends]
    positions = torch.tensor(pos, device=device)
    recent = torch.randn(batch, bs, hkv, d, generator=gen).to(device=device, dtype=dtype)
    keys = torch.randn(batch, cap, hkv, dg, generator=gen).to(device=device, dtype=dtype)
    k_new = torch.randn(batch, hkv, d, generator=gen).to(device=device, dtype=dtype)
    weight, norm, inv_freq, scaling = _params(draw, hkv, 3 * d, dg, dtype, device, gen)

    got_recent, got_keys = recent.clone(), keys.clone()
    with use_backend(name):
        ops.gate_cache_append(k_new, got_recent, got_keys, positions, weight, norm, inv_freq, scaling)
    ref_recent, ref_keys = recent.clone(), keys.clone()
    ref_cache.gate_cache_append(k_new, ref_recent, ref_keys, positions, weight, norm, inv_freq, scaling, 1e-6)

    assert torch.equal(got_recent, ref_recent)
    done = torch.zeros(batch, cap, dtype=torch.bool, device=device)
    for b, p in enumerate(pos):
        if p % bs == bs - 1 and p // bs < cap:
            done[b, p // bs] = True
    assert torch.equal(got_keys[~done], keys[~done]), "an entry changed in a row that did not complete it"
    if done.any():
        assert_close("entry", ref_keys[done].float(), got_keys[done].float(), RTOL[dtype])


@pytest.mark.parametrize(("device", "name"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prefill_then_decode_is_exact(device, name, dtype):
    """On the fused path: prefill N then append M tokens gives bit for bit the entries of a
    prefill of N+M (ragged left-padded rows completing blocks at different steps)."""
    torch.manual_seed(0)
    bs = 16
    gate = AttnGate(2, 2, 64, 32).to(device=device, dtype=dtype)
    seq = [40, 17, 31]
    s, steps = max(seq), 19
    k = torch.randn(3, s + steps, 2, 64, device=device).to(dtype)
    offsets = torch.tensor([s - n for n in seq], dtype=torch.int32, device=device)
    with use_backend(name):
        cache = GateCache.prefill(gate, k[:, :s], torch.tensor(seq, dtype=torch.int32, device=device), offsets, bs,
                                  capacity=5, fused=True)
        for t in range(steps):
            positions = torch.tensor([n + t for n in seq], device=device)
            cache.append(gate, k[:, s + t], DecodePlan.build(positions, offsets, bs, dense_until=0), fused=True)
        total = [n + steps for n in seq]
        ref = GateCache.prefill(gate, k, torch.tensor(total, dtype=torch.int32, device=device), offsets, bs,
                                capacity=5, fused=True)
    for row, n in enumerate(total):
        x, y = cache.keys[row, : n // bs], ref.keys[row, : n // bs]
        assert torch.equal(x, y), f"row {row}: max diff {(x.float() - y.float()).abs().max()}"


@pytest.mark.parametrize(("device", "name"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_matches_torch_path(device, name, dtype):
    """AttnGate.project_q and GateCache prefill/append: fused == the torch code within the
    dtype's tolerance (the torch path rounds the projection to the weight dtype first)."""
    torch.manual_seed(1)
    bs = 16
    gate = AttnGate(2, 4, 64, 32, rope=GateRotary(GateRotary.default(32, 1e6).inv_freq, 1.1))
    with torch.no_grad():
        gate.attngate_qnorm.weight.uniform_(0.5, 1.5)
        gate.attngate_knorm.weight.uniform_(0.5, 1.5)
    gate = gate.to(device=device, dtype=dtype)
    q = torch.randn(3, 5, 8, 64, device=device).to(dtype)
    pos = torch.randint(0, 40_000, (3, 5), device=device)
    with use_backend(name):
        fused = gate.project_q(q, pos, fused=True)
    assert_close("project_q", gate.project_q(q, pos, fused=False).float(), fused.float(), RTOL[dtype])

    k = torch.randn(3, 50, 2, 64, device=device).to(dtype)
    lens = torch.tensor([50, 33, 47], dtype=torch.int32, device=device)
    offs = 50 - lens
    caches = {}
    for f in (False, True):
        with use_backend(name):
            cache = GateCache.prefill(gate, k, lens, offs, bs, capacity=4, fused=f)
            plan = DecodePlan.build(lens.long(), offs, bs, dense_until=0)  # positions 50, 33, 47: row 2 completes
            cache.append(gate, k[:, 0], plan, fused=f)
        caches[f] = cache
    assert torch.equal(caches[True].recent, caches[False].recent)
    complete = [(0, 3), (1, 2), (2, 3)]  # complete entries per row after the step (incl. row 2's new one)
    for row, n in complete:
        assert_close(f"keys row {row}", caches[False].keys[row, :n].float(), caches[True].keys[row, :n].float(),
                     RTOL[dtype])


def test_auto_choice_follows_grad_mode_and_device():
    from seerattn_r.gate import use_fused

    x = torch.zeros(1)
    assert not use_fused(None, x)
    with torch.no_grad():
        assert not use_fused(None, x)  # CPU: the torch code, unless asked
        assert use_fused(True, x)
    if torch.cuda.is_available():
        with torch.no_grad():
            assert use_fused(None, x.cuda())
        assert not use_fused(None, x.cuda())


def _decode_step(gate, cache, q_pre, k_new, plan):
    cache.append(gate, k_new, plan, fused=True)
    return gate.project_q(q_pre, plan.positions, fused=True)


def test_opcheck_and_compile_fullgraph():
    """The three ops pass opcheck; a fused decode step compiles with fullgraph=True and
    mutates the cache like eager."""
    torch.manual_seed(2)
    gate = AttnGate(2, 2, 64, 32)
    q = torch.randn(2, 4, 64)
    k = torch.randn(2, 48, 2, 64)
    lens = torch.tensor([47, 30], dtype=torch.int32)
    offs = torch.tensor([0, 17], dtype=torch.int32)
    kw = (gate.attngate_linear_k.weight.detach(), gate.attngate_knorm.weight.detach(), gate.rope.inv_freq, 1.0, 1e-6)
    qw = (gate.attngate_linear_q.weight.detach(), gate.attngate_qnorm.weight.detach(), gate.rope.inv_freq)
    pos = lens.long()
    for op, args in (
        (torch.ops.seerattn.gate_project_q.default, (q, *qw, pos, 1.1, 1e-6)),
        (torch.ops.seerattn.gate_keys.default, (k, lens, 16, *kw, offs)),
        (torch.ops.seerattn.gate_cache_append.default,
         (k[:, 0].contiguous(), torch.randn(2, 16, 2, 64), torch.randn(2, 3, 2, 32), pos, *kw)),
    ):
        torch.library.opcheck(op, args)

    with torch.no_grad():
        caches = [GateCache.prefill(gate, k, lens, offs, 16, capacity=3, fused=True) for _ in range(2)]
        plan = DecodePlan.build(pos, offs, 16, dense_until=0)  # position 47 completes row 0's block 2
        eager = _decode_step(gate, caches[0], q, k[:, 5], plan)
        torch._dynamo.reset()
        compiled = torch.compile(_decode_step, fullgraph=True)(gate, caches[1], q, k[:, 5], plan)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert torch.equal(caches[1].keys, caches[0].keys) and torch.equal(caches[1].recent, caches[0].recent)


def _weights(hkv=2, group=2, d=64, dg=32):
    return (torch.randn(hkv, group, d, dg), torch.ones(dg), torch.ones(dg // 2))


BAD_Q = {
    "q rank": (dict(q_pre=torch.randn(2, 1, 4, 64)), ValueError, "q_pre must have shape"),
    "q dtype": (dict(q_pre=torch.randn(2, 4, 64).double()), TypeError, "q_pre must have dtype"),
    "heads": (dict(q_pre=torch.randn(2, 6, 64)), ValueError, "Hkv \\* g = Hq"),
    "weight D": (dict(weight=torch.randn(2, 2, 32, 32)), ValueError, "weight must have shape"),
    "weight strided": (dict(weight=torch.randn(2, 2, 64, 64)[..., ::2]), ValueError, "weight must be contiguous"),
    "odd Dg": (dict(weight=torch.randn(2, 2, 64, 33), norm_weight=torch.ones(33)), ValueError, "must be even"),
    "norm shape": (dict(norm_weight=torch.ones(16)), ValueError, "norm_weight must be"),
    "inv_freq dtype": (dict(inv_freq=torch.ones(16).double()), TypeError, "inv_freq must have dtype"),
    "positions dtype": (dict(positions=torch.zeros(2)), TypeError, "positions must have dtype"),
    "positions shape": (dict(positions=torch.zeros(3, dtype=torch.long)), ValueError, "positions must have shape"),
}


@pytest.mark.parametrize("case", list(BAD_Q))
def test_gate_project_q_bad_input(case):
    w, n, f = _weights()
    args = dict(q_pre=torch.randn(2, 4, 64), weight=w, norm_weight=n, inv_freq=f, positions=torch.zeros(2).long())
    change, exc, msg = BAD_Q[case]
    with pytest.raises(exc, match=msg):
        ops.gate_project_q(**{**args, **change})


BAD_APPEND = {
    "k_new shape": (dict(k_new=torch.randn(2, 2, 32)), ValueError, "k_new must have shape"),
    "k_new dtype": (dict(k_new=torch.randn(2, 2, 64).half()), TypeError, "k_new must have the dtype of recent"),
    "block size": (dict(recent=torch.randn(2, 24, 2, 64)), ValueError, "block_size must be one of"),
    "keys heads": (dict(keys=torch.randn(2, 3, 1, 32)), ValueError, "keys .* must match recent"),
    "weight rows": (dict(weight=torch.randn(2, 64, 32)), ValueError, "weight must have shape"),
    "positions": (dict(positions=torch.zeros(2, dtype=torch.int16)), TypeError, "positions must have dtype"),
}


@pytest.mark.parametrize("case", list(BAD_APPEND))
def test_gate_cache_append_bad_input(case):
    args = dict(k_new=torch.randn(2, 2, 64), recent=torch.randn(2, 16, 2, 64), keys=torch.randn(2, 3, 2, 32),
                positions=torch.zeros(2).long(), weight=torch.randn(2, 192, 32), norm_weight=torch.ones(32),
                inv_freq=torch.ones(16))
    change, exc, msg = BAD_APPEND[case]
    with pytest.raises(exc, match=msg):
        ops.gate_cache_append(**{**args, **change})


def test_gate_keys_bad_input():
    k, lens = torch.randn(2, 32, 2, 64), torch.full((2,), 32, dtype=torch.int32)
    w, n, f = torch.randn(2, 192, 32), torch.ones(32), torch.ones(16)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.gate_keys(k, lens, 16, torch.randn(2, 64, 32), n, f)
    with pytest.raises(ValueError, match="weight must have Hkv=2"):
        ops.gate_keys(k, lens, 16, torch.randn(3, 192, 32), n, f)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype"):
        ops.gate_keys(k, lens.long(), 16, w, n, f)
    with pytest.raises(ValueError, match="block_size must be one of"):
        ops.gate_keys(k, lens, 20, w, n, f)
