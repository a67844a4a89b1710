"""``gate_project_q``: the gate query of one decode step (projection, RMSNorm, RoPE)."""

from __future__ import annotations

import torch

from seerattn_r import backend
from seerattn_r.ops import _checks as chk

RMS_EPS = 1e-6
POSITION_DTYPES = (torch.int32, torch.int64)


def check_gate_params(weight, weight_shape: tuple, weight_doc: str, norm_weight, inv_freq) -> None:
    """Checks shared by the gate ops: ``weight`` has ``weight_shape`` (``None`` entries
    free) and is contiguous, ``norm_weight [Dg]``, ``inv_freq [Dg/2]`` float32."""
    chk.tensor("weight", weight, len(weight_shape), weight_doc)
    chk.dtype_in("weight", weight, chk.ATTN_DTYPES)
    if any(want is not None and got != want for got, want in zip(weight.shape, weight_shape)):
        raise ValueError(f"weight must have shape {weight_doc}, got {tuple(weight.shape)}")
    if not weight.is_contiguous():
        raise ValueError("weight must be contiguous (a gate parameter as stored)")
    dg = weight.shape[-1]
    if dg % 2:
        raise ValueError(f"the gate dim Dg (weight.shape[-1]) must be even (RoPE rotates pairs), got {dg}")
    chk.tensor("norm_weight", norm_weight, 1, f"[Dg={dg}]")
    chk.dtype_in("norm_weight", norm_weight, chk.ATTN_DTYPES)
    if norm_weight.shape[0] != dg or norm_weight.stride(0) != 1:
        raise ValueError(f"norm_weight must be a contiguous [Dg={dg}], got shape {tuple(norm_weight.shape)}")
    chk.tensor("inv_freq", inv_freq, 1, f"[Dg/2={dg // 2}] float32")
    chk.dtype_in("inv_freq", inv_freq, (torch.float32,))
    if inv_freq.shape[0] != dg // 2 or inv_freq.stride(0) != 1:
        raise ValueError(f"inv_freq must be a contiguous [Dg/2={dg // 2}], got shape {tuple(inv_freq.shape)}")


def check_positions(positions, batch: int) -> None:
    chk.tensor("positions", positions, 1, "[B] int32/int64")
    chk.dtype_in("positions", positions, POSITION_DTYPES)
    if positions.shape[0] != batch:
        raise ValueError(f"positions must have shape [B] = [{batch}], got {tuple(positions.shape)}")


def _check(q_pre, weight, norm_weight, inv_freq, positions) -> None:
    chk.tensor("q_pre", q_pre, 3, "[B, Hq, D]")
    chk.dtype_in("q_pre", q_pre, chk.ATTN_DTYPES)
    chk.last_dim_contiguous("q_pre", q_pre)
    batch, hq, d = q_pre.shape
    check_gate_params(weight, (None, None, d, None), f"[Hkv, g, D={d}, Dg]", norm_weight, inv_freq)
    hkv, group = weight.shape[:2]
    if hkv * group != hq:
        raise ValueError(f"weight [Hkv={hkv}, g={group}, ...] needs Hkv * g = Hq query heads, q_pre has {hq}")
    check_positions(positions, batch)
    chk.same_device({"q_pre": q_pre, "weight": weight, "norm_weight": norm_weight, "inv_freq": inv_freq,
                     "positions": positions})


@torch.library.custom_op("seerattn::gate_project_q", mutates_args=())
def _gate_project_q_op(
    q_pre: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    positions: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = RMS_EPS,
) -> torch.Tensor:
    _check(q_pre, weight, norm_weight, inv_freq, positions)
    impl = backend.resolve("gate_project_q", q_pre.device)
    return impl(q_pre, weight, norm_weight, inv_freq, positions, attention_scaling, eps)


@_gate_project_q_op.register_fake
def _(q_pre, weight, norm_weight, inv_freq, positions, attention_scaling=1.0, eps=RMS_EPS):
    _check(q_pre, weight, norm_weight, inv_freq, positions)
    return q_pre.new_empty(q_pre.shape[0], weight.shape[0], weight.shape[-1])


def gate_project_q(
    q_pre: torch.Tensor,
    weight: torch.Tensor,
    norm_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    positions: torch.Tensor,
    attention_scaling: float = 1.0,
    eps: float = RMS_EPS,
) -> torch.Tensor:
    """The gate query of each row: grouped projection, RMSNorm and RoPE, fused.

    Args:
        q_pre: ``[B, Hq, D]`` pre-RoPE query, fp16/bf16/fp32, last dim contiguous.
        weight: ``[Hkv, g, D, Dg]`` contiguous (``attngate_linear_q.weight``); query heads
            ``h*g .. h*g+g-1`` are projected together into KV head ``h``.
        norm_weight: ``[Dg]`` RMSNorm weight (``attngate_qnorm.weight``).
        inv_freq: ``[Dg/2]`` float32 RoPE frequencies (:class:`~seerattn_r.gate.GateRotary`).
        positions: ``[B]`` int32/int64 absolute position of each row's query.
        attention_scaling: multiplies cos and sin (transformers' rope ``attention_scaling``).
        eps: RMSNorm epsilon.

    Returns:
        ``[B, Hkv, Dg]`` in ``q_pre``'s dtype: ``q_pre`` is cast to the weight's dtype (as
        the torch path of :class:`~seerattn_r.gate.AttnGate` does), the products are
        accumulated in fp32 and, unlike that path, not rounded before the fp32 norm and RoPE.
    """
    _check(q_pre, weight, norm_weight, inv_freq, positions)  # before the dispatcher's type checks
    return _gate_project_q_op(q_pre, weight, norm_weight, inv_freq, positions, attention_scaling, eps)
