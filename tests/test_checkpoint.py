"""Gate checkpoints: the published layout (config.json + attn_gate_weights.pth, bf16) and
ours (safetensors) load into patch_model; wrong shapes and foreign gates are named."""

from __future__ import annotations

import json

import pytest
import torch

from seerattn_r import SparseDecodeConfig, patch_model
from seerattn_r.checkpoint import gate_key, load_gates, save_gates
from tests._models import tiny_model

PUBLISHED_CONFIG = {
    "base_model": "tiny-qwen3",
    "seerattn_gate_block_size": 16,
    "seerattn_gate_hidden_size": 64,
    "seerattn_k_seq_pooling_type": "Kmaxminavg",
    "seerattn_q_head_pooling_type": "Qproj",
    "seerattn_use_qk_norm": True,
    "seerattn_use_rope": True,
}


def _published_tensors(layers=2, hkv=2, g=2, d=64, dg=64, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        out[gate_key(i, "attngate_linear_q.weight")] = torch.randn(hkv, g, d, dg, generator=gen)
        out[gate_key(i, "attngate_linear_k.weight")] = torch.randn(hkv, 3 * d, dg, generator=gen)
        out[gate_key(i, "attngate_qnorm.weight")] = torch.rand(dg, generator=gen) + 0.5
        out[gate_key(i, "attngate_knorm.weight")] = torch.rand(dg, generator=gen) + 0.5
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


def _write_published(tmp_path, tensors, config=PUBLISHED_CONFIG):
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(tensors, tmp_path / "attn_gate_weights.pth")
    return tmp_path


def _config(**kw):
    return SparseDecodeConfig(**{"block_size": 16, "token_budget": 32, "min_sparse_length": 0, **kw})


def test_published_layout_loads_into_model(tmp_path):
    tensors = _published_tensors()
    state, cfg = load_gates(_write_published(tmp_path, tensors))
    assert cfg == PUBLISHED_CONFIG
    assert all(torch.equal(state[k], v) and state[k].dtype == torch.bfloat16 for k, v in tensors.items())
    model = patch_model(tiny_model("qwen3"), _config(), gates=tmp_path)
    for k, v in tensors.items():
        assert torch.equal(model.state_dict()[k], v.float())


def test_our_format_round_trips_and_selects_the_same(tmp_path):
    """Gates saved from a patched model and loaded into another copy give the same tokens."""
    from tests._models import greedy, left_padded

    model = patch_model(tiny_model("qwen3"), _config(gate_dim=64))
    out = save_gates(model.state_dict(), {"seerattn_gate_block_size": 16, "base_model": "tiny"}, tmp_path / "g")
    assert (out / "attn_gate_weights.safetensors").is_file()
    state, cfg = load_gates(out)
    assert cfg["seerattn_gate_hidden_size"] == 64 and cfg["seerattn_k_seq_pooling_type"] == "Kmaxminavg"
    assert set(state) == {k for k in model.state_dict() if ".attn_gate." in k}
    other = patch_model(tiny_model("qwen3"), _config(), gates=out)
    ids, mask = left_padded([40, 27])
    assert torch.equal(greedy(model, ids, mask, 20), greedy(other, ids, mask, 20))


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    tensors = _published_tensors()
    key = gate_key(1, "attngate_linear_k.weight")
    tensors[key] = torch.zeros(2, 100, 64, dtype=torch.bfloat16)
    _write_published(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.attn_gate\.attngate_linear_k\.weight.*"
                                         r"\(2, 100, 64\).*\(2, 192, 64\)"):
        patch_model(tiny_model("qwen3"), _config(), gates=tmp_path)


@pytest.mark.parametrize("case", ["missing-layer", "more-layers", "other-heads"])
def test_gates_for_another_model(tmp_path, case):
    if case == "missing-layer":
        tensors = _published_tensors(layers=1)
        match = r"no tensor 'model\.layers\.1\.self_attn\.attn_gate\.attngate_linear_q\.weight'"
    elif case == "more-layers":
        tensors = _published_tensors(layers=3)
        match = r"'model\.layers\.2\.self_attn\.attn_gate\..*another model"
    else:
        tensors = _published_tensors(hkv=4, g=1)
        match = r"attngate_linear_q\.weight' has shape \(4, 1, 64, 64\).*needs \(2, 2, 64, 64\)"
    _write_published(tmp_path, tensors)
    with pytest.raises(ValueError, match=match):
        patch_model(tiny_model("qwen3"), _config(), gates=tmp_path)


def test_bad_directories_and_configs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gates(tmp_path / "nope")
    _write_published(tmp_path, _published_tensors())
    with pytest.raises(ValueError, match="block size 16, config.block_size is 32"):
        patch_model(tiny_model("qwen3"), _config(block_size=32), gates=tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**PUBLISHED_CONFIG, "seerattn_k_seq_pooling_type": "Kmax"}))
    with pytest.raises(ValueError, match="seerattn_k_seq_pooling_type"):
        load_gates(tmp_path)
    (tmp_path / "attn_gate_weights.pth").unlink()
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_CONFIG))
    with pytest.raises(FileNotFoundError, match="attn_gate_weights"):
        load_gates(tmp_path)
    with pytest.raises(ValueError, match="no gate tensor"):
        save_gates({"model.embed_tokens.weight": torch.zeros(2)}, PUBLISHED_CONFIG, tmp_path / "x")
