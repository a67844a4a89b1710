"""patch_model on random-weight Qwen3, Qwen2 and Llama: generation, left padding, pre-RoPE
capture, the no-copy rule of the decode step, statistics and unpatching (CPU, torch
backend unless SEERATTN_BACKEND says otherwise)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seerattn_r import SparseDecodeConfig, patch_model, unpatch_model
from seerattn_r.integrations import sparsity_stats
from seerattn_r.integrations.hf import cache_argument
from tests._models import greedy, left_padded, tiny_model

BS = 16


def sparse_config(**kw) -> SparseDecodeConfig:
    base = dict(block_size=BS, token_budget=32, min_sparse_length=0, gate_dim=64)
    return SparseDecodeConfig(**{**base, **kw})


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
@pytest.mark.parametrize("budget", ["token_budget", "threshold"])
def test_full_budget_matches_dense(kind, budget):
    """A budget covering the context (or threshold 0) reads every block: the greedy tokens
    equal the unpatched model's, for a left-padded batch of ragged prompts."""
    model = tiny_model(kind)
    ids, mask = left_padded([37, 20, 45])
    ref = greedy(model, ids, mask, 24)
    sel = {"token_budget": 4096} if budget == "token_budget" else {"threshold": 0.0, "token_budget": None}
    patch_model(model, sparse_config(**sel))
    out = greedy(model, ids, mask, 24)
    assert torch.equal(out, ref)
    assert sparsity_stats(model)["density"] == pytest.approx(1.0)


@pytest.mark.parametrize("selection", ["oracle", "quest"])
def test_baseline_selections_full_budget_match_dense(selection):
    model = tiny_model("qwen3")
    ids, mask = left_padded([29, 40])
    ref = greedy(model, ids, mask, 16)
    patch_model(model, sparse_config(token_budget=4096, selection=selection))
    assert torch.equal(greedy(model, ids, mask, 16), ref)


@pytest.mark.parametrize("selection", ["gate", "oracle", "quest"])
def test_left_padded_batch_equals_each_prompt_alone(selection):
    """Blocks are aligned to each row's first real token, so padding changes nothing: a
    sparse (small budget) batch decodes each row exactly as that row decoded alone."""
    model = tiny_model("qwen3")
    patch_model(model, sparse_config(selection=selection))
    lengths = [45, 23, 34]
    ids, mask = left_padded(lengths)
    new = 30
    batch = greedy(model, ids, mask, new)
    assert sparsity_stats(model, reset=True)["density"] < 1.0
    for b, n in enumerate(lengths):
        alone = greedy(model, ids[b:b + 1, -n:], mask[b:b + 1, -n:], new)
        assert torch.equal(alone[0, -new:], batch[b, -new:]), f"row {b}"


def test_static_cache_and_sampling():
    model = tiny_model("llama")
    ids, mask = left_padded([30, 41])
    patch_model(model, sparse_config())
    dynamic = greedy(model, ids, mask, 20)
    static = greedy(model, ids, mask, 20, cache_implementation="static")
    assert torch.equal(dynamic, static)
    torch.manual_seed(3)
    with torch.no_grad():
        sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=True,
                                 top_k=20, pad_token_id=0)
    assert sampled.shape == (2, ids.shape[1] + 20)


def test_min_sparse_length_and_dense_layers_keep_dense():
    """Rows no longer than min_sparse_length decode densely (a per-row device mask); a
    dense layer is reported by no statistic."""
    model = tiny_model("qwen3")
    ids, mask = left_padded([30, 41])
    ref = greedy(model, ids, mask, 20)
    patch_model(model, sparse_config(token_budget=16, min_sparse_length=64, dense_layers=(1,)))
    assert torch.equal(greedy(model, ids, mask, 20), ref)
    stats = sparsity_stats(model)
    assert [row["layer"] for row in stats["layers"]] == [0]
    assert stats["row_steps"] == 2 * 19


def test_sparse_budget_reads_less():
    model = tiny_model("qwen2")
    ids, mask = left_padded([60, 52])
    patch_model(model, sparse_config(token_budget=16))
    greedy(model, ids, mask, 20)
    stats = sparsity_stats(model)
    for row in stats["layers"]:
        # sink + one scored block + the current one: at most 3 of ~4-5 blocks.
        assert 0.3 < row["density"] < 0.8


@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_pre_rope_capture_matches_direct_computation(kind):
    model = tiny_model(kind)
    patch_model(model, sparse_config())
    ids, mask = left_padded([12, 9])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    rt = model._seerattn
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(out.hidden_states[i])
        q = attn.q_proj(x).view(2, 12, -1, 64)
        k = attn.k_proj(x).view(2, 12, -1, 64)
        if kind == "qwen3":
            q, k = attn.q_norm(q), attn.k_norm(k)
        torch.testing.assert_close(rt.q_pre[i], q, rtol=0, atol=0)
        torch.testing.assert_close(rt.k_pre[i], k, rtol=0, atol=0)


class _Allocations(TorchDispatchMode):
    """Records every new (non-aliasing) tensor an op returns, and the storages passed to
    seerattn.sparse_decode."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []
        self.decode_storages: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.seerattn.sparse_decode.default:
            self.decode_storages += [args[1].untyped_storage().data_ptr(), args[2].untyped_storage().data_ptr()]
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append((str(func), t.numel()))
        return out


def test_decode_step_copies_no_cache():
    """The decode step passes views of transformers' static cache to sparse_decode and no
    op of the integration allocates a tensor as large as a layer's K cache (the kernels
    themselves are opaque here)."""
    from transformers import StaticCache

    model = tiny_model("qwen3")
    patch_model(model, sparse_config())
    ids, mask = left_padded([40, 33])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=512)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, **{cache_argument(model): cache}, use_cache=True)
        mode = _Allocations()
        with mode:
            model(input_ids=ids[:, -1:], position_ids=pos[:, -1:] + 1, **{cache_argument(model): cache}, use_cache=True,
                  attention_mask=torch.cat([mask, mask[:, -1:]], 1))
    layer_cache = cache.layers[0].keys
    storages = {layer.keys.untyped_storage().data_ptr() for layer in cache.layers}
    storages |= {layer.values.untyped_storage().data_ptr() for layer in cache.layers}
    assert mode.decode_storages and set(mode.decode_storages) <= storages
    big = [(f, n) for f, n in mode.sizes if n >= layer_cache.numel()]
    assert not big, f"cache-sized allocations in the decode step: {big}"


def test_unpatch_restores_model():
    model = tiny_model("qwen3")
    ids, mask = left_padded([20, 31])
    ref = greedy(model, ids, mask, 12)
    names = set(model.state_dict())
    patch_model(model, sparse_config(token_budget=16))
    assert any("attn_gate" in k for k in model.state_dict())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "attn_gate" not in n)
    with pytest.raises(ValueError, match="already patched"):
        patch_model(model, sparse_config())
    unpatch_model(model)
    assert set(model.state_dict()) == names
    assert all(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(greedy(model, ids, mask, 12), ref)


def test_unsupported_model_and_bad_config():
    import transformers

    cfg = transformers.MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    with pytest.raises(ValueError, match="llama, qwen2, qwen3"):
        patch_model(transformers.MistralForCausalLM(cfg), sparse_config())
    with pytest.raises(TypeError, match="SparseDecodeConfig"):
        patch_model(tiny_model(), {"token_budget": 64})
    with pytest.raises(ValueError, match="dense_layers"):
        patch_model(tiny_model(), sparse_config(dense_layers=(5,)))
    with pytest.raises(ValueError, match="exactly one of token_budget and threshold"):
        SparseDecodeConfig(token_budget=64, threshold=0.01)
    with pytest.raises(ValueError, match="block_size"):
        SparseDecodeConfig(block_size=48, token_budget=64)
    with pytest.raises(ValueError, match="quest"):
        SparseDecodeConfig(threshold=0.01, selection="quest")


def test_generate_command_runs_offline(capsys):
    from seerattn_r.cli import main

    rc = main(["generate", "--max-new-tokens", "6", "--token-budget", "16", "--block-size", "16",
               "--gate-dim", "64", "--min-sparse-length", "0", "--prompt", "x" * 40, "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0 and "tokens/s" in err and "sparsity" in err
    assert main(["generate", "--model", "/definitely/not/here"]) == 2
    assert "does not exist" in capsys.readouterr().err


def _kernel_device() -> str | None:
    """Where the Triton kernels can run: a GPU, or the CPU under the interpreter."""
    import os

    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET", "0") == "1" else None


@pytest.mark.skipif(_kernel_device() is None, reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_backend_in_the_model_matches_torch_backend():
    """The same sparse generation (small budget, left-padded batch) with every op on its
    Triton kernel and on the reference: same tokens (fp32)."""
    from seerattn_r import use_backend

    device = _kernel_device()
    model = tiny_model("qwen3").to(device)
    patch_model(model, sparse_config(token_budget=16))
    ids, mask = left_padded([37, 20])
    ids, mask = ids.to(device), mask.to(device)
    with use_backend("torch"):
        ref = greedy(model, ids, mask, 6)
    with use_backend("triton"):
        assert torch.equal(greedy(model, ids, mask, 6), ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", ["qwen3", "qwen2", "llama"])
def test_full_budget_matches_dense_on_gpu(kind):
    """As on CPU, with the GPU kernels the backend picks (fp32: the Triton path)."""
    model = tiny_model(kind).cuda()
    ids, mask = left_padded([37, 20, 45])
    ids, mask = ids.cuda(), mask.cuda()
    ref = greedy(model, ids, mask, 32)
    patch_model(model, sparse_config(token_budget=4096))
    assert torch.equal(greedy(model, ids, mask, 32), ref)
    assert torch.equal(greedy(model, ids, mask, 32, cache_implementation="static"), ref)
