"""AttnGate against a direct computation with transformers' own rotary embedding."""

from __future__ import annotations

import copy

import pytest
import torch

from seerattn_r.gate import AttnGate, GateRotary, build_gates
from tests.utils import assert_close

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 1e6},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 1024},
    "llama3": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
}


def _config(rope: dict):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=64, hidden_size=128, num_hidden_layers=3, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=64, max_position_embeddings=8192, rope_parameters=rope)


def _direct_rope(cfg, gate_dim: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """RoPE by the model's own rotary class on a config whose head dim is Dg."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    gcfg = copy.deepcopy(cfg)
    gcfg.head_dim = gate_dim
    rotary = Qwen3RotaryEmbedding(gcfg)
    cos, sin = rotary(x, positions)
    out, _ = apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=-2)
    return out


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


@pytest.mark.parametrize("rope", list(ROPES))
def test_project_q_and_k_match_direct_computation(rope):
    torch.manual_seed(0)
    cfg = _config(ROPES[rope])
    gate = build_gates(cfg, gate_dim=32)[1]
    with torch.no_grad():
        gate.attngate_qnorm.weight.uniform_(0.5, 1.5)
        gate.attngate_knorm.weight.uniform_(0.5, 1.5)
    q = torch.randn(2, 5, 8, 64)
    pos = torch.randint(0, 6000, (2, 5))
    wq = gate.attngate_linear_q.weight  # [Hkv, g, D, Dg]
    y = torch.stack([q[..., h * 4:(h + 1) * 4, :].flatten(-2) @ wq[h].flatten(0, 1) for h in range(2)], dim=-2)
    ref = _direct_rope(cfg, 32, _rms(y, gate.attngate_qnorm.weight), pos)
    assert_close("q_gate", ref, gate.project_q(q, pos).detach(), 1e-5)

    pooled = torch.randn(2, 7, 2, 192)
    starts = torch.arange(7).expand(2, 7) * 64
    y = torch.stack([pooled[:, :, h] @ gate.attngate_linear_k.weight[h] for h in range(2)], dim=-2)
    ref = _direct_rope(cfg, 32, _rms(y, gate.attngate_knorm.weight), starts)
    assert_close("k_gate", ref, gate.project_k(pooled, starts).detach(), 1e-5)


def test_published_parameter_names_and_shapes():
    gate = AttnGate(num_kv_heads=8, group=4, head_dim=128, gate_dim=128)
    shapes = {k: tuple(v.shape) for k, v in gate.state_dict().items()}
    assert shapes == {
        "attngate_linear_q.weight": (8, 4, 128, 128),
        "attngate_linear_k.weight": (8, 384, 128),
        "attngate_qnorm.weight": (128,),
        "attngate_knorm.weight": (128,),
    }


def test_build_gates_shares_rope_and_casting_keeps_fp32_frequencies():
    gates = build_gates(_config(ROPES["yarn"]), gate_dim=32).to(torch.bfloat16)
    assert len(gates) == 3 and gates[0].rope is gates[2].rope
    assert gates[0].rope.inv_freq.dtype == torch.float32
    assert gates[0].attngate_linear_q.weight.dtype == torch.bfloat16
    assert gates[0].project_q(torch.randn(1, 8, 64, dtype=torch.bfloat16), torch.tensor([7])).dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="gate_dim"):
        AttnGate(2, 2, 64, 33)
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttnGate(0, 2, 64, 32)
    with pytest.raises(ValueError, match="rope rotates 64 channels"):
        AttnGate(2, 2, 64, 32, rope=GateRotary.default(64))
