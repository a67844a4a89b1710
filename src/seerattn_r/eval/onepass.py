"""Teacher-forced sparse decoding of a whole sequence in one forward.

In real decoding, the token at position ``t`` attends only to the KV blocks its selection
picks (the gate's, the oracle's or Quest's, computed from its own query and from the
cache written by the tokens before it), and the K/V it adds to every layer's cache come
from hidden states that were themselves computed with sparse attention. A single forward
over the sequence computes exactly that when every query row ``t`` of every layer
attends causally to the tokens of the blocks selected *for row t* only: row ``t``'s
hidden states, and hence its K and V at the next layer, then depend on earlier rows just
as the decode steps did. Selection for row ``t`` follows the decode path
(:mod:`seerattn_r.integrations.hf`) op for op:

* gate: ``gate_scores(project_q(q_pre_t, t), K-compression cache of the complete blocks
  j < t // bs)``, the cache entry of block ``j`` being ``project_k(kpool(k_pre of block
  j), j * bs)``;
* oracle: the block-max softmax probability of the post-RoPE query over tokens ``<= t``,
  max over the GQA group (:func:`seerattn_r.baselines.oracle_block_scores`);
* Quest: ``sum_d max(q_d kmin_d, q_d kmax_d)`` per query head over each complete block's
  post-RoPE key bounds (:func:`seerattn_r.baselines.quest_block_scores`);

then ``select_blocks(scores, t // bs, t + 1, ...)`` with the sink and current blocks
forced. Rows inside the prompt (prefill is dense) or with ``t + 1 <=
config.dense_until`` read every block, as do ``config.dense_layers``.

The attention runs in fp32 over chunks of query rows (``[Hq, chunk, S]`` scores, never
``S x S`` per head at once), so it is an exact evaluation, not a fast one.
``tests/test_fidelity.py`` checks it against ``generate`` with the patched model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from seerattn_r import ops
from seerattn_r.backend import use_backend
from seerattn_r.config import SparseDecodeConfig
from seerattn_r.gate import AttnGate
from seerattn_r.integrations.hf import capture_pre_rope

ATTN_NAME = "seerattn_onepass"


@dataclass
class LayerStats:
    """Per-layer sums over the sparse rows (position, and the heads of each).

    Attributes:
        recall: ``[L]`` float64, sum over (row, query head) of the dense attention mass
            inside the row's selected tokens.
        heads: ``[L]`` float64, number of (row, query head) terms in ``recall``.
        read: ``[L]`` float64, sum over rows of the tokens read (mean over query heads).
        present: ``[L]`` float64, sum over rows of the tokens in the cache (``t + 1``).
    """

    recall: torch.Tensor
    heads: torch.Tensor
    read: torch.Tensor
    present: torch.Tensor

    @classmethod
    def zeros(cls, layers: int) -> LayerStats:
        return cls(*(torch.zeros(layers, dtype=torch.float64) for _ in range(4)))

    def add(self, other: LayerStats) -> None:
        for name in ("recall", "heads", "read", "present"):
            getattr(self, name).add_(getattr(other, name))


@dataclass
class _Pass:
    config: SparseDecodeConfig | None
    gates: Sequence[AttnGate] | None
    prompt_len: int
    chunk: int
    stats: LayerStats
    q_pre: dict
    k_pre: dict


_state: _Pass | None = None


def _gate_keys(gate: AttnGate, k_pre: torch.Tensor, block_size: int) -> torch.Tensor:
    """``[1, nb, Hkv, Dg]`` K compression cache of the complete blocks of ``k_pre [S, Hkv, D]``
    (one zero entry when there is none, so shapes stay non-empty)."""
    s, hkv = k_pre.shape[0], k_pre.shape[1]
    nb = s // block_size
    if nb == 0:
        return k_pre.new_zeros(1, 1, hkv, gate.gate_dim)
    full = torch.tensor([nb * block_size], dtype=torch.int32, device=k_pre.device)
    pooled = ops.kpool(k_pre[None, : nb * block_size], full, block_size)
    starts = torch.arange(nb, device=k_pre.device)[None] * block_size
    return gate.project_k(pooled, starts)


def _gate_scores(gate: AttnGate, q_pre: torch.Tensor, k_gate: torch.Tensor, rows: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """``[C, Hkv, nb]`` gate probabilities of query ``rows`` over the complete blocks before
    each row's own block (``q_pre [S, Hq, D]``, ``k_gate`` from :func:`_gate_keys`)."""
    q_gate = gate.project_q(q_pre[rows], rows)  # [C, Hkv, Dg]
    num = torch.div(rows, block_size, rounding_mode="floor").to(torch.int32)
    return ops.gate_scores(q_gate, k_gate.expand(rows.numel(), -1, -1, -1), num)


def _quest_scores(q: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``[C, Hq, nb]`` Quest bounds of queries ``q [Hq, C, D]`` (fp32) over blocks with
    key bounds ``(kmin, kmax)`` ``[nb, Hkv, D]``: ``max(q kmin, q kmax)`` summed over
    ``d`` is ``q+ . kmax + q- . kmin``, two matmuls instead of a ``[C, Hq, nb, D]`` tensor."""
    kmin, kmax = bounds
    hq, hkv = q.shape[0], kmin.shape[1]
    qg = q.unflatten(0, (hkv, hq // hkv))  # [Hkv, g, C, D]
    s = torch.einsum("hgcd,nhd->chgn", qg.clamp(min=0), kmax) + torch.einsum("hgcd,nhd->chgn", qg.clamp(max=0), kmin)
    return s.flatten(1, 2)


def _sparse_attention(query, key, value, scaling, layer: int, q_pre, k_pre, st: _Pass):
    """One row of the batch: ``query [Hq, S, D]``, ``key``/``value`` ``[Hkv, S, D]`` post-RoPE;
    ``q_pre [S, Hq, D]``, ``k_pre [S, Hkv, D]``. Returns ``[S, Hq, Dv]`` fp32."""
    cfg = st.config
    hq, s, d = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    device = query.device
    sparse_layer = cfg is not None and layer not in cfg.dense_layers
    bs = cfg.block_size if cfg is not None else 1
    nblk = math.ceil(s / bs)
    k_rep, v_rep = key.float().repeat_interleave(group, 0), value.float().repeat_interleave(group, 0)
    key_pos = torch.arange(s, device=device)
    out = torch.empty(s, hq, value.shape[-1], dtype=torch.float32, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # recall, heads, read, present
    if sparse_layer and cfg.selection == "gate":
        k_gate = _gate_keys(st.gates[layer], k_pre, bs)
    if sparse_layer and cfg.selection == "quest":
        nb = max(s // bs, 1)
        full = torch.tensor([s], dtype=torch.int32, device=device)
        pooled = ops.kpool(key.transpose(0, 1)[None], full, bs)[0, :nb].float()
        bounds = (pooled[..., d:2 * d], pooled[..., :d])
    for c0 in range(0, s, st.chunk):
        c1 = min(c0 + st.chunk, s)
        rows = torch.arange(c0, c1, device=device)
        q_rows = query[:, c0:c1].float()  # [Hq, C, D]
        logits = torch.einsum("hcd,hsd->hcs", q_rows, k_rep) * scaling
        causal = key_pos[None, :] <= rows[:, None]  # [C, S]
        logits = logits.masked_fill(~causal, float("-inf"))
        if not sparse_layer:
            probs = logits.softmax(-1)
        else:
            dense_probs = logits.softmax(-1)  # [Hq, C, S]
            seqlens = (rows + 1).to(torch.int32)
            last = torch.div(rows, bs, rounding_mode="floor").to(torch.int32)
            if cfg.selection == "gate":
                scores = _gate_scores(st.gates[layer], q_pre, k_gate, rows, bs)
            elif cfg.selection == "oracle":
                padded = torch.nn.functional.pad(dense_probs, (0, nblk * bs - s))
                scores = padded.view(hkv, group, rows.numel(), nblk, bs).amax(dim=(1, 4)).transpose(0, 1)
            else:
                scores = _quest_scores(q_rows, bounds)
            idx = ops.select_blocks(scores.contiguous(), last, seqlens, bs, cfg.selection_budget,
                                    cfg.threshold, cfg.sink_block)
            idx = idx.long()
            chosen = torch.zeros(*idx.shape[:2], nblk + 1, dtype=torch.bool, device=device)
            chosen.scatter_(2, torch.where(idx >= 0, idx, nblk), True)
            chosen = chosen[..., :nblk]
            dense_row = (rows < st.prompt_len) | (seqlens <= cfg.dense_until)
            chosen = chosen | dense_row[:, None, None]
            if chosen.shape[1] == hkv:
                chosen = chosen.repeat_interleave(group, dim=1)
            mask = chosen.repeat_interleave(bs, dim=2)[..., :s].transpose(0, 1) & causal  # [Hq, C, S]
            probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)
            # Device-side sums (no host sync per chunk); dense rows count for nothing.
            sparse = (~dense_row).double()
            sums += torch.stack([
                ((dense_probs * mask).sum(-1).double() * sparse).sum(),
                sparse.sum() * hq,
                (mask.sum(-1).double() * sparse).sum() / hq,
                (seqlens.double() * sparse).sum(),
            ])
        out[c0:c1] = torch.einsum("hcs,hsd->chd", probs, v_rep)
    if sparse_layer:
        for name, total in zip(("recall", "heads", "read", "present"), sums.cpu()):
            getattr(st.stats, name)[layer] += total
    return out


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function (``query [B, Hq, S, D]`` post-RoPE,
    ``key``/``value`` ``[B, Hkv, S, D]``) -> ``([B, S, Hq, Dv], None)``."""
    st = _state
    if st is None:
        raise RuntimeError(f"attention implementation {ATTN_NAME!r} runs only inside one_pass()")
    if query.shape[2] != key.shape[2]:
        raise ValueError("one-pass evaluation runs one forward over the whole sequence (no KV cache)")
    layer = module.layer_idx
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_pre, k_pre = st.q_pre.pop(layer), st.k_pre.pop(layer)
    rows = [
        _sparse_attention(query[b], key[b], value[b], scaling, layer, q_pre[b], k_pre[b], st)
        for b in range(query.shape[0])
    ]
    return torch.stack(rows).to(query.dtype), None


@contextlib.contextmanager
def one_pass(
    model: nn.Module,
    config: SparseDecodeConfig | None,
    gates: Sequence[AttnGate] | None = None,
    prompt_len: int = 0,
    chunk: int = 256,
    backend: str | None = "torch",
) -> Iterator[LayerStats]:
    """Within this block, a forward of ``model`` (no KV cache, no padding) decodes every
    position sparsely as described in the module docstring.

    Args:
        model: a transformers ``Qwen3``/``Qwen2``/``Llama`` causal LM, unpatched.
        config: the selection (``selection``, ``block_size``, ``token_budget`` or
            ``threshold``, ``sink_block``, ``dense_layers``, ``min_sparse_length``); None
            runs dense causal attention through the same code (the reference).
        gates: one :class:`AttnGate` per layer (needed for ``selection="gate"``), on the
            model's device.
        prompt_len: positions ``< prompt_len`` are a dense prefill.
        chunk: query rows per attention chunk (memory ``~ 3 * Hq * chunk * S * 4`` bytes).
        backend: backend of the selection ops (``"torch"``: the reference; None follows
            ``SEERATTN_BACKEND``).

    Yields:
        the :class:`LayerStats` the forward accumulates (on CPU).
    """
    global _state
    if _state is not None:
        raise RuntimeError("one_pass() does not nest")
    if config is not None and config.selection == "gate":
        layers = len(model.base_model.layers)
        if gates is None or len(gates) != layers:
            raise ValueError(f"selection='gate' needs one gate per layer ({layers}), got "
                             f"{None if gates is None else len(gates)}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    st = _Pass(config, gates, prompt_len, chunk, LayerStats.zeros(model.config.num_hidden_layers), {}, {})
    handles = capture_pre_rope(model, st.q_pre, st.k_pre, user="one-pass evaluation")
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    previous = {key: cfg._attn_implementation for key, cfg in configs.items()}
    scope = use_backend(backend) if backend is not None else contextlib.nullcontext()
    _state = st
    try:
        for cfg in configs.values():
            cfg._attn_implementation = ATTN_NAME
        with scope:
            yield st.stats
    finally:
        _state = None
        for key, cfg in configs.items():
            cfg._attn_implementation = previous[key]
        for h in handles:
            h.remove()


@torch.no_grad()
def one_pass_logits(
    model: nn.Module,
    input_ids: torch.Tensor,
    config: SparseDecodeConfig | None,
    gates: Sequence[AttnGate] | None = None,
    prompt_len: int = 0,
    chunk: int = 256,
    backend: str | None = "torch",
) -> tuple[torch.Tensor, LayerStats]:
    """``(logits [B, S, V] fp32, stats)`` of a forward under :func:`one_pass`.

    ``input_ids [B, S]`` int64: B unpadded sequences of the same length, positions 0..S-1.
    Position ``t``'s logits are the next-token prediction after decoding token ``t``.
    """
    with one_pass(model, config, gates, prompt_len, chunk, backend) as stats:
        logits = model(input_ids=input_ids, use_cache=False).logits
    return logits.float(), stats
