"""Bad arguments give a TypeError/ValueError that names the argument; nothing crashes."""

from __future__ import annotations

import pytest
import torch

from seerattn_r import ops

B, HQ, HKV, D, S, BS = 2, 8, 2, 64, 64, 16


def good():
    return dict(
        q=torch.randn(B, HQ, D, dtype=torch.float16),
        k_cache=torch.randn(B, S, HKV, D, dtype=torch.float16),
        v_cache=torch.randn(B, S, HKV, D, dtype=torch.float16),
        cache_seqlens=torch.full((B,), S, dtype=torch.int32),
        block_indices=torch.zeros(B, HKV, 3, dtype=torch.int32),
        block_size=BS,
    )


SPARSE_DECODE_CASES = {
    "q rank": (dict(q=torch.randn(B, HQ, 1, D, dtype=torch.float16)), ValueError, "q must have shape"),
    "Hq not multiple": (dict(q=torch.randn(B, 7, D, dtype=torch.float16)), ValueError, "multiple of"),
    "D mismatch": (dict(k_cache=torch.randn(B, S, HKV, 128, dtype=torch.float16)), ValueError, "k_cache must have shape"),
    "unsupported D": (
        dict(q=torch.randn(B, HQ, 80, dtype=torch.float16), k_cache=torch.randn(B, S, HKV, 80, dtype=torch.float16),
             v_cache=torch.randn(B, S, HKV, 80, dtype=torch.float16)), ValueError, "head dim D"),
    "v shape": (dict(v_cache=torch.randn(B, S + 1, HKV, D, dtype=torch.float16)), ValueError, "v_cache must have shape"),
    "kv dtype": (dict(k_cache=torch.randn(B, S, HKV, D, dtype=torch.bfloat16)), TypeError, "k_cache must have the dtype"),
    "q dtype": (dict(q=torch.randn(B, HQ, D).to(torch.float64)), TypeError, "q must have dtype"),
    "index heads": (dict(block_indices=torch.zeros(B, 3, 3, dtype=torch.int32)), ValueError, "block_indices must have shape"),
    "index dtype": (dict(block_indices=torch.zeros(B, HKV, 3, dtype=torch.int64)), TypeError, "block_indices must have dtype"),
    "seqlens dtype": (dict(cache_seqlens=torch.full((B,), S, dtype=torch.int64)), TypeError, "cache_seqlens must have dtype"),
    "seqlens shape": (dict(cache_seqlens=torch.full((B + 1,), S, dtype=torch.int32)), ValueError, "cache_seqlens must have shape"),
    "block size": (dict(block_size=48), ValueError, "block_size must be one of"),
    "block size type": (dict(block_size=16.0), TypeError, "block_size must be an int"),
    "last dim strided": (
        dict(k_cache=torch.randn(B, S, HKV, 2 * D, dtype=torch.float16)[..., ::2]), ValueError, "k_cache must be contiguous"),
    "not a tensor": (dict(q=[1, 2, 3]), TypeError, "q must be a torch.Tensor"),
    "offsets dtype": (dict(cache_offsets=torch.zeros(B, dtype=torch.float32)), TypeError, "cache_offsets must have dtype"),
    "device mix": (dict(cache_seqlens=torch.full((B,), S, dtype=torch.int32, device="meta")), ValueError, "one device"),
}


@pytest.mark.parametrize("case", list(SPARSE_DECODE_CASES))
def test_sparse_decode_bad_input(case):
    change, exc, msg = SPARSE_DECODE_CASES[case]
    args = good() | change
    with pytest.raises(exc, match=msg):
        ops.sparse_decode(**args)


def test_kpool_bad_input():
    k = torch.randn(B, S, HKV, D)
    lens = torch.full((B,), S, dtype=torch.int32)
    with pytest.raises(ValueError, match="k must have shape"):
        ops.kpool(k[0], lens, BS)
    with pytest.raises(ValueError, match="block_size must be one of"):
        ops.kpool(k, lens, 24)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype"):
        ops.kpool(k, lens.long(), BS)


def test_gate_scores_bad_input():
    qg, kg = torch.randn(B, HKV, 32), torch.randn(B, 5, HKV, 32)
    num = torch.full((B,), 5, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_gate must have shape"):
        ops.gate_scores(qg, torch.randn(B, 5, HKV, 16), num)
    with pytest.raises(TypeError, match="num_blocks must have dtype"):
        ops.gate_scores(qg, kg, num.float())


def test_select_blocks_bad_input():
    scores = torch.rand(B, HKV, 6)
    num = torch.full((B,), 5, dtype=torch.int32)
    lens = torch.full((B,), 6 * BS, dtype=torch.int32)
    with pytest.raises(ValueError, match="exactly one of token_budget"):
        ops.select_blocks(scores, num, lens, BS)
    with pytest.raises(ValueError, match="exactly one of token_budget"):
        ops.select_blocks(scores, num, lens, BS, token_budget=64, threshold=0.1)
    with pytest.raises(TypeError, match="scores must have dtype"):
        ops.select_blocks(scores.half(), num, lens, BS, token_budget=64)
    with pytest.raises(ValueError, match="token_budget must be >= 0"):
        ops.select_blocks(scores, num, lens, BS, token_budget=-1)


def test_contents_checked_only_in_debug(monkeypatch):
    args = good() | dict(cache_seqlens=torch.full((B,), S + 5, dtype=torch.int32))
    ops.sparse_decode(**args)  # no sync, no check: tokens past the cache are not read
    monkeypatch.setenv("SEERATTN_DEBUG", "1")
    with pytest.raises(ValueError, match="cache_offsets \\+ cache_seqlens must be <="):
        ops.sparse_decode(**args)
    args = good() | dict(block_indices=torch.full((B, HKV, 3), -5, dtype=torch.int32))
    with pytest.raises(ValueError, match="block_indices must be >= -1"):
        ops.sparse_decode(**args)
