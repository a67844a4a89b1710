"""Running the frozen model as its gates' teacher, one layer at a time.

While :func:`teacher_attention` is active, every attention layer of the model computes its
attention with ``attn_block_max`` (registered in transformers' attention interface, so no
model code is copied or patched): the op's output *is* the layer's attention output, and
its block-max target comes out of the same pass. For each layer the callback receives a
:class:`LayerTensors` right after that layer's attention and before the next layer runs,
so a caller can compute the layer's loss, backpropagate into its gate and drop the target
before the next one exists: only one layer's target is alive at a time.

Pre-RoPE q and k come from forward hooks on ``q_norm``/``k_norm`` (Qwen3: after the
per-head norm, before the rotary embedding) or, for models without them (Qwen2 with its
bias, Llama), on ``q_proj``/``k_proj``.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface

from seerattn_r.integrations.hf import capture_pre_rope
from seerattn_r.ops.attn_block_max import attn_block_max

ATTN_IMPLEMENTATION = "seerattn_teacher"


@dataclass
class LayerTensors:
    """What a layer's callback gets (batch ``B`` = 1 packed row of ``T`` tokens).

    Attributes:
        layer_idx: the layer.
        q_pre: ``[1, T, Hq, D]`` pre-RoPE queries (model dtype).
        k_pre: ``[1, T, Hkv, D]`` pre-RoPE keys.
        q: ``[1, T, Hq, D]`` post-RoPE queries (strided view).
        k: ``[1, T, Hkv, D]`` post-RoPE keys (strided view).
        target: ``[1, Hkv, T, Nblk]`` fp32 block-max ground truth (see ``attn_block_max``).
        sm_scale: the layer's softmax scale.
    """

    layer_idx: int
    q_pre: torch.Tensor
    k_pre: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    target: torch.Tensor
    sm_scale: float


@dataclass
class _State:
    block_size: int
    cu_seqlens: torch.Tensor
    max_seqlen: int
    on_layer: Callable[[LayerTensors], None]
    pre_q: dict[int, torch.Tensor]
    pre_k: dict[int, torch.Tensor]


_active: contextvars.ContextVar[_State | None] = contextvars.ContextVar("seerattn_teacher", default=None)


def _teacher_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function: ``query [B, Hq, T, D]``, ``key``/``value``
    ``[B, Hkv, T, D]`` post-RoPE; returns ``([B, T, Hq, Dv], None)``."""
    state = _active.get()
    if state is None:
        raise RuntimeError(f"attention implementation {ATTN_IMPLEMENTATION!r} runs only inside teacher_attention()")
    if kwargs.get("sliding_window") is not None:
        raise ValueError("gate training does not support sliding-window attention layers")
    if query.shape[0] != 1:
        raise ValueError(f"the teacher runs one packed row at a time, got batch {query.shape[0]}")
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    out, target = attn_block_max(q, k, v, state.block_size, scaling, state.cu_seqlens, state.max_seqlen)
    idx = module.layer_idx
    state.on_layer(LayerTensors(idx, state.pre_q.pop(idx), state.pre_k.pop(idx), q, k, target, scaling))
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, _teacher_attention_forward)


@contextlib.contextmanager
def teacher_attention(
    model: nn.Module,
    block_size: int,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    on_layer: Callable[[LayerTensors], None],
) -> Iterator[None]:
    """Within this block, a forward of ``model`` on one packed row calls ``on_layer`` once
    per attention layer (see the module docstring). ``cu_seqlens`` ``[N + 1]`` int32 on the
    model's device gives the row's document boundaries; pass ``position_ids`` that restart
    at each boundary to the forward. The model's attention implementation is restored on
    exit."""
    state = _State(block_size, cu_seqlens, max_seqlen, on_layer, {}, {})
    handles = capture_pre_rope(model, state.pre_q, state.pre_k, user="gate training")
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    previous = {key: cfg._attn_implementation for key, cfg in configs.items()}
    token = _active.set(state)
    try:
        for cfg in configs.values():
            cfg._attn_implementation = ATTN_IMPLEMENTATION
        yield
    finally:
        _active.reset(token)
        for key, cfg in configs.items():
            cfg._attn_implementation = previous[key]
        for h in handles:
            h.remove()
