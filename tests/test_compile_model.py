"""One decode step of a patched model under torch.compile(fullgraph=True): no graph break,
same logits as eager; on a GPU also replayed from CUDA graphs with a static cache."""

from __future__ import annotations

import pytest
import torch

from seerattn_r import SparseDecodeConfig, patch_model
from seerattn_r.integrations.hf import cache_argument
from tests._models import left_padded, tiny_model


def _setup(device: str, dtype=torch.float32):
    from transformers import StaticCache

    model = tiny_model("qwen3").to(device=device, dtype=dtype)
    patch_model(model, SparseDecodeConfig(block_size=16, token_budget=32, min_sparse_length=0, gate_dim=64))
    ids, mask = left_padded([40, 29])
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = cache_argument(model)  # outside the compiled step: no signature inspection in a graph

    def prefill():
        cache = StaticCache(config=model.config, max_cache_len=128)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_arg: cache},
                           use_cache=True).logits
        return cache, logits[:, -1:].argmax(-1)

    def step(tok, position, attention_mask, cache):
        return model(input_ids=tok, position_ids=position, attention_mask=attention_mask, **{cache_arg: cache},
                     use_cache=True).logits

    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return model, prefill, step, pos[:, -1:] + 1, step_mask


def test_decode_step_compiles_fullgraph_cpu():
    _, prefill, step, position, step_mask = _setup("cpu")
    cache, tok = prefill()
    with torch.no_grad():
        eager = step(tok, position, step_mask, cache)
    cache, tok = prefill()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True)(tok, position, step_mask, cache)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def _teacher_forced(fn, prefill, position, steps: int, tokens=None):
    """Logits of ``steps`` decode steps ``[B, steps, V]`` and the tokens fed. Each step is
    fed ``tokens[:, i]`` when given (else its own argmax), so two runs compare step by
    step and a near-tie argmax flip cannot send them down different continuations."""
    cache, tok = prefill()
    outs, fed = [], []
    with torch.no_grad():
        for i in range(steps):
            if tokens is not None:
                tok = tokens[:, i : i + 1]
            fed.append(tok)
            # No attention mask: sparse layers address rows by position and offset, and
            # a growing mask would change the step's shapes.
            logits = fn(tok, position + i, None, cache)
            outs.append(logits.clone())
            tok = logits[:, -1:].argmax(-1)
    return torch.cat(outs, 1), torch.cat(fed, 1)


def test_compiled_steps_match_eager_across_block_completions_cpu():
    """20 compiled steps (fullgraph) match eager ones, fed the same tokens: the gate's cache
    update, which completes a block twice in these steps, is in the graph and takes effect."""
    model, prefill, step, position, _ = _setup("cpu")
    eager, tokens = _teacher_forced(step, prefill, position, 20)
    torch._dynamo.reset()
    compiled, _ = _teacher_forced(torch.compile(step, fullgraph=True), prefill, position, 20, tokens)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_decode_steps_replay_from_cuda_graphs():
    """Several steps of the compiled step under mode='reduce-overhead' (CUDA graphs, static
    cache; two of them complete a block) match eager steps fed the same tokens.

    fp32: what this checks is that the replayed graphs read and update the caches as the
    eager steps do. In bf16 inductor's fused RMSNorm/rotary round differently from eager,
    which moved 1.3% of the logits past 2e-2 by step 17 on an H100 and said nothing about
    the graphs."""
    model, prefill, step, position, _ = _setup("cuda", torch.float32)
    eager, tokens = _teacher_forced(step, prefill, position, 20)
    torch._dynamo.reset()
    compiled, _ = _teacher_forced(torch.compile(step, mode="reduce-overhead", fullgraph=True), prefill, position,
                                  20, tokens)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tilelang_steps_replay_from_cuda_graphs_like_triton():
    """The TileLang kernel inside compiled steps replayed from CUDA graphs (reduce-overhead,
    fp16; its split counters come from the capture reservoir): the same logits as the same
    compiled steps with the Triton kernel, fed the same tokens."""
    from seerattn_r.backend import use_backend
    from tests.utils import gpu_backends

    if "tilelang" not in gpu_backends():
        pytest.skip("tilelang is not available on this GPU")
    _, prefill, step, position, _ = _setup("cuda", torch.float16)
    runs = {}
    for name in ("triton", "tilelang"):
        torch._dynamo.reset()
        with use_backend(name):
            runs[name], tokens = _teacher_forced(torch.compile(step, mode="reduce-overhead", fullgraph=True), prefill,
                                                 position, 20, runs.get("tokens"))
        runs.setdefault("tokens", tokens)
    torch.testing.assert_close(runs["tilelang"], runs["triton"], rtol=2e-2, atol=2e-2)
