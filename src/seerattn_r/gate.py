"""The AttnGate: a small per-layer module that scores KV blocks for the current query.

Math (DESIGN.md "The method"): the pre-RoPE query of a GQA group, ``[Hkv, g, D]``, is
contracted with ``Wq [Hkv, g, D, Dg]``; a block's pre-RoPE keys are pooled
``[max | min | mean]`` (``3D``) and contracted with ``Wk [Hkv, 3D, Dg]``. Both branches are
RMS-normalised over ``Dg`` in fp32 (eps 1e-6, one weight ``[Dg]`` per branch) and
rotated with a RoPE of rotary dim ``Dg`` that follows the base model's rope type, theta
and scaling: queries at their absolute position, compressed keys at their block's
first token. Parameter names and shapes are those of the published SeerAttention-R gates.

Two paths compute the same thing: the torch code here (differentiable, what training runs)
and the fused decode ops (:func:`seerattn_r.ops.gate_project_q`, ``gate_keys``,
``gate_cache_append``: one kernel each on a GPU instead of a chain of small ones). The
fused path runs where :func:`use_fused` says so: asked for explicitly, or by default
under ``torch.no_grad`` on a GPU.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from seerattn_r import ops
from seerattn_r.ops.gate_project_q import RMS_EPS  # one value for the torch and the fused paths
INIT_STD = 0.02


def use_fused(fused: bool | None, x: torch.Tensor) -> bool:
    """Whether the gate takes the fused (non-differentiable) decode ops for input ``x``.

    ``fused=True``/``False`` forces the choice (``True`` runs the ops on any device, through
    the selected backend); ``None`` means: only when no gradient is being recorded and
    ``x`` is on a GPU (CUDA or ROCm), where the fused kernels replace a dozen launches.
    """
    if fused is not None:
        return fused
    return x.device.type == "cuda" and not torch.is_grad_enabled()


class GateRotary(nn.Module):
    """Rotate-half RoPE over the gate's ``Dg`` channels.

    ``inv_freq [Dg/2]`` float32 and ``attention_scaling`` come from transformers' rope
    initialisation run on a copy of the model config whose head dim is ``Dg``, so the
    model's rope type (default, linear, yarn, llama3, ...) and theta are honoured.
    ``dynamic`` scaling is evaluated at the config's ``max_position_embeddings`` (the
    gate's frequencies never change during decoding).
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._inv_freq_fp32 = inv_freq.float().cpu()
        self.attention_scaling = float(attention_scaling)

    def _apply(self, fn, recurse=True):
        # `model.to(bfloat16)` casts every float buffer; the frequencies must stay fp32
        # (bf16 positions * frequencies are wrong by whole turns at long contexts).
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq_fp32.to(self.inv_freq.device)
        return self

    @classmethod
    def default(cls, dim: int, theta: float = 10000.0) -> GateRotary:
        """Plain RoPE with base ``theta`` over ``dim`` channels."""
        return cls(1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))

    @classmethod
    def from_model_config(cls, model_config, gate_dim: int) -> GateRotary:
        """The gate RoPE of a transformers model config (``Qwen3Config``, ``LlamaConfig``...)."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        cfg = copy.deepcopy(model_config)
        cfg.head_dim = gate_dim
        # The gate rotates all of its Dg channels, whatever the model does with its own.
        cfg.partial_rotary_factor = 1.0
        params = getattr(cfg, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            theta = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
            return cls.default(gate_dim, float(theta))
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(
                f"the model's rope_type {rope_type!r} is not one transformers knows "
                f"({', '.join(sorted(ROPE_INIT_FUNCTIONS))})"
            )
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, None)
        return cls(inv_freq, scaling)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., H, Dg]`` (fp32) by ``positions [...]`` (int); returns fp32."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class _Weight(nn.Module):
    """Holds one parameter named ``weight`` (the published state-dict key layout)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(*shape))


class AttnGate(nn.Module):
    """The decode gate of one attention layer.

    Args:
        num_kv_heads: ``Hkv``.
        group: ``g = Hq / Hkv``.
        head_dim: the attention head dim ``D``.
        gate_dim: ``Dg``.
        rope: the gate's :class:`GateRotary` (shared by all layers of a model; default
            plain RoPE with theta 10000 over ``Dg``).

    Parameters (published names): ``attngate_linear_q.weight [Hkv, g, D, Dg]``,
    ``attngate_linear_k.weight [Hkv, 3D, Dg]``, ``attngate_qnorm.weight [Dg]``,
    ``attngate_knorm.weight [Dg]``. ``rope`` holds only a non-persistent buffer, so the
    state dict has exactly these four keys.
    """

    def __init__(
        self,
        num_kv_heads: int,
        group: int,
        head_dim: int,
        gate_dim: int = 128,
        rope: GateRotary | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_kv_heads", num_kv_heads), ("group", group),
                            ("head_dim", head_dim), ("gate_dim", gate_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if gate_dim % 2:
            raise ValueError(f"gate_dim must be even (RoPE rotates pairs), got {gate_dim}")
        self.num_kv_heads, self.group, self.head_dim, self.gate_dim = num_kv_heads, group, head_dim, gate_dim
        self.attngate_linear_q = _Weight(num_kv_heads, group, head_dim, gate_dim)
        self.attngate_linear_k = _Weight(num_kv_heads, 3 * head_dim, gate_dim)
        self.attngate_qnorm = _Weight(gate_dim)
        self.attngate_knorm = _Weight(gate_dim)
        self.rope = rope if rope is not None else GateRotary.default(gate_dim)
        if self.rope.inv_freq.numel() * 2 != gate_dim:
            raise ValueError(
                f"rope rotates {self.rope.inv_freq.numel() * 2} channels but gate_dim is {gate_dim}"
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The training recipe's init: N(0, 0.02) projections, unit norm weights."""
        nn.init.normal_(self.attngate_linear_q.weight, std=INIT_STD)
        nn.init.normal_(self.attngate_linear_k.weight, std=INIT_STD)
        nn.init.ones_(self.attngate_qnorm.weight)
        nn.init.ones_(self.attngate_knorm.weight)

    def _norm_rope(self, x: torch.Tensor, weight: torch.Tensor, positions: torch.Tensor, dtype) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * weight.float()
        return self.rope(x, positions).to(dtype)

    def project_q(self, q_pre: torch.Tensor, positions: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
        """Gate query.

        Args:
            q_pre: ``[..., Hq, D]`` pre-RoPE query (after Qwen3's ``q_norm``), any float dtype.
            positions: ``[...]`` integer absolute positions of those queries.
            fused: run :func:`seerattn_r.ops.gate_project_q` (one kernel, not
                differentiable) instead of the torch code; default :func:`use_fused`.

        Returns:
            ``[..., Hkv, Dg]`` in ``q_pre``'s dtype: the group's queries projected together,
            RMS-normed (fp32) and RoPE'd at ``positions``. The fused path keeps the
            projection in fp32; the torch path rounds it to the weight's dtype first.
        """
        w = self.attngate_linear_q.weight
        if use_fused(fused, q_pre):
            lead = q_pre.shape[:-2]
            out = ops.gate_project_q(
                q_pre.reshape(-1, *q_pre.shape[-2:]), w, self.attngate_qnorm.weight, self.rope.inv_freq,
                positions.expand(lead).reshape(-1), self.rope.attention_scaling, RMS_EPS)
            return out.reshape(*lead, *out.shape[1:])
        x = q_pre.unflatten(-2, (self.num_kv_heads, self.group)).to(w.dtype)
        y = torch.einsum("...hgd,hgde->...he", x, w)
        return self._norm_rope(y, self.attngate_qnorm.weight, positions, q_pre.dtype)

    def project_k(self, pooled: torch.Tensor, block_start_positions: torch.Tensor) -> torch.Tensor:
        """Compressed keys.

        Args:
            pooled: ``[B, N, Hkv, 3D]`` ``[max | min | mean]`` of each block's pre-RoPE keys
                (:func:`seerattn_r.ops.kpool`).
            block_start_positions: ``[B, N]`` integer position of each block's first token.

        Returns:
            ``[B, N, Hkv, Dg]`` in ``pooled``'s dtype (the K compression cache entries).
        """
        w = self.attngate_linear_k.weight
        # One [1, 3D] x [3D, Dg] product per (row, block, head), whatever N is: a block's
        # entry is then bit-identical whether prefill or a decode step computes it (a GEMM
        # over N rows may round differently than over 1).
        y = torch.matmul(pooled.to(w.dtype).unsqueeze(-2), w).squeeze(-2)
        return self._norm_rope(y, self.attngate_knorm.weight, block_start_positions, pooled.dtype)

    def extra_repr(self) -> str:
        return (f"num_kv_heads={self.num_kv_heads}, group={self.group}, head_dim={self.head_dim}, "
                f"gate_dim={self.gate_dim}")


def attention_shape(model_config) -> tuple[int, int, int, int]:
    """``(num_layers, Hq, Hkv, D)`` of a transformers decoder config."""
    hq = model_config.num_attention_heads
    hkv = getattr(model_config, "num_key_value_heads", None) or hq
    d = getattr(model_config, "head_dim", None) or model_config.hidden_size // hq
    return model_config.num_hidden_layers, hq, hkv, d


def build_gates(model_config, gate_dim: int = 128) -> nn.ModuleList:
    """Fresh (N(0, 0.02)-initialised) gates for every layer of a transformers model.

    Args:
        model_config: the model's config (``model.config``), e.g. ``Qwen3Config``.
        gate_dim: ``Dg``.

    Returns:
        ``nn.ModuleList`` of ``num_hidden_layers`` :class:`AttnGate` in fp32 on CPU, sharing
        one :class:`GateRotary` built from the model's rope settings. Move it with
        ``.to(device, dtype)``. ``patch_model(model, config, gates=...)`` accepts it, and
        ``{f"model.layers.{i}.self_attn.attn_gate.{k}": v}`` over its state dicts is the
        checkpoint layout :func:`seerattn_r.checkpoint.save_gates` writes.
    """
    layers, hq, hkv, d = attention_shape(model_config)
    if hq % hkv:
        raise ValueError(f"num_attention_heads={hq} is not a multiple of num_key_value_heads={hkv}")
    rope = GateRotary.from_model_config(model_config, gate_dim)
    return nn.ModuleList(AttnGate(hkv, hq // hkv, d, gate_dim, rope) for _ in range(layers))
