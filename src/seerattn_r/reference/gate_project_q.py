"""Reference gate query branch (see :func:`seerattn_r.ops.gate_project_q`), and the
RMSNorm + RoPE both gate branches end with."""

from __future__ import annotations

import torch


def norm_rope(
    y: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    positions: torch.Tensor,
    attention_scaling: float,
    eps: float,
) -> torch.Tensor:
    """RMSNorm over the last dim of ``y [..., H, Dg]`` (fp32), then rotate-half RoPE at
    ``positions [...]``: ``[..., H, Dg]`` fp32."""
    y = y.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()
    angle = (positions[..., None].float() * inv_freq.float())[..., None, :]
    cos, sin = angle.cos() * attention_scaling, angle.sin() * attention_scaling
    y1, y2 = y.chunk(2, dim=-1)
    return torch.cat((y1 * cos - y2 * sin, y2 * cos + y1 * sin), dim=-1)


def gate_project_q(
    q_pre: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    positions: torch.Tensor,
    attention_scaling: float,
    eps: float,
) -> torch.Tensor:
    """``q_pre [B, Hq, D]`` -> ``[B, Hkv, Dg]`` in q_pre's dtype: q_pre rounded to the
    weight's dtype, then all math in fp32."""
    hkv, group = weight.shape[:2]
    x = q_pre.to(weight.dtype).float().unflatten(-2, (hkv, group))
    y = torch.einsum("bhgd,hgde->bhe", x, weight.float())
    return norm_rope(y, norm_weight, inv_freq, positions, attention_scaling, eps).to(q_pre.dtype)
