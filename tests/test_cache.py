"""The K compression cache: prefill N then decode M equals prefill N+M, per row of a
ragged left-padded batch; its size against the KV cache."""

from __future__ import annotations

import pytest
import torch

from seerattn_r import SparseDecodeConfig, patch_model
from seerattn_r.cache import DecodePlan, GateCache
from seerattn_r.gate import AttnGate
from seerattn_r.integrations.hf import cache_argument
from tests._models import left_padded, tiny_model
from tests.utils import assert_close

BS = 16


def _complete(keys: torch.Tensor, seqlens: list[int]) -> list[torch.Tensor]:
    return [keys[b, : n // BS] for b, n in enumerate(seqlens)]


@pytest.mark.parametrize("lengths", [[45, 23, 34], [16, 33]], ids=["ragged", "block-edge"])
def test_model_prefill_then_decode_matches_longer_prefill(lengths):
    """Through the patched model (hooks, plan, per-row masks): the compression cache after
    prefilling each row's first tokens and decoding the rest one token per step is the
    cache of prefilling everything at once. Not bit-exact here only because the model's
    own k_proj of one token and of a sequence round differently (~1e-7); the exact
    invariant, on identical keys, is the next test."""
    model = tiny_model("qwen3")
    # A budget covering the context: later layers see the same hidden states either way.
    patch_model(model, SparseDecodeConfig(block_size=BS, token_budget=4096, min_sparse_length=0, gate_dim=64))
    rt = model._seerattn
    ids, mask = left_padded(lengths)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    n, steps = ids.shape[1], 37
    extra = torch.randint(1, 200, (len(lengths), steps), generator=torch.Generator().manual_seed(5))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    full_pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache = {cache_argument(model): out.past_key_values}
        for t in range(steps):
            i = n + t
            model(input_ids=full_ids[:, i:i + 1], attention_mask=full_mask[:, :i + 1],
                  position_ids=full_pos[:, i:i + 1], **cache, use_cache=True)
        decoded = [c.keys.clone() for c in rt.layers]
        model(input_ids=full_ids, attention_mask=full_mask, position_ids=full_pos, use_cache=True)
        prefilled = [c.keys for c in rt.layers]
    seqlens = [x + steps for x in lengths]
    for layer, (a, b) in enumerate(zip(decoded, prefilled)):
        for row, (x, y) in enumerate(zip(_complete(a, seqlens), _complete(b, seqlens))):
            assert_close(f"layer {layer} row {row}", y, x, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_then_decode_is_exact(dtype):
    """GateCache on the same pre-RoPE keys: prefill N then append M tokens gives bit for
    bit the entries of a prefill of N+M (left-padded ragged rows, blocks completing at
    different steps per row)."""
    torch.manual_seed(0)
    gate = AttnGate(2, 2, 64, 32).to(dtype)
    seq = [70, 41, 55]
    s, steps = max(seq), 29
    k = torch.randn(3, s + steps, 2, 64, dtype=dtype)
    offsets = torch.tensor([s - n for n in seq], dtype=torch.int32)
    cache = GateCache.prefill(gate, k[:, :s], torch.tensor(seq, dtype=torch.int32), offsets, BS, capacity=8)
    for t in range(steps):
        positions = torch.tensor([n + t for n in seq])
        cache.append(gate, k[:, s + t], DecodePlan.build(positions, offsets, BS, dense_until=0))
    total = [n + steps for n in seq]
    ref = GateCache.prefill(gate, k, torch.tensor(total, dtype=torch.int32), offsets, BS, capacity=8)
    for row, (x, y) in enumerate(zip(_complete(cache.keys, total), _complete(ref.keys, total))):
        assert torch.equal(x, y), f"row {row}: max diff {(x.float() - y.float()).abs().max()}"


def test_append_only_touches_completing_rows():
    """GateCache.append writes an entry only in rows whose block completes this step."""
    torch.manual_seed(0)
    gate = AttnGate(2, 2, 64, 32)
    k = torch.randn(2, 40, 2, 64)
    seqlens = torch.tensor([31, 24], dtype=torch.int32)
    offsets = torch.tensor([9, 16], dtype=torch.int32)
    cache = GateCache.prefill(gate, k, seqlens, offsets, BS, capacity=4)
    before = cache.keys.clone()
    plan = DecodePlan.build(seqlens.long(), offsets, BS, dense_until=0)  # positions 31, 24
    cache.append(gate, torch.randn(2, 2, 64), plan)
    assert torch.equal(cache.keys[1], before[1])  # row 1: token 24 of block 1, not complete
    assert not torch.equal(cache.keys[0, 1], before[0, 1])  # row 0: token 31 completes block 1
    assert torch.equal(cache.keys[0, 0], before[0, 0])


def test_memory_is_a_small_fraction_of_the_kv_cache():
    """Compression cache of Dg=128 at block 64 and D=128: 1/128 of K+V (the recent buffer
    adds one block of keys per row)."""
    gate = AttnGate(8, 4, 128, 128)
    s = 64 * 64
    cache = GateCache.prefill(gate, torch.zeros(1, s, 8, 128, dtype=torch.bfloat16),
                              torch.tensor([s], dtype=torch.int32), torch.zeros(1, dtype=torch.int32),
                              64, capacity=s // 64)
    kv_bytes = 2 * s * 8 * 128 * 2
    assert cache.keys.numel() * cache.keys.element_size() * 128 == kv_bytes
    assert cache.memory_bytes() < kv_bytes / 50
