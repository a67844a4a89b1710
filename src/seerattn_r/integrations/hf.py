"""Sparse decoding inside transformers decoder models (Qwen3, Qwen2, Llama).

How it plugs in, without copying model code:

* an attention function registered in transformers' ``AttentionInterface`` under
  :data:`ATTN_NAME` (and the SDPA mask under the same name); ``patch_model`` points the
  model's ``config._attn_implementation`` at it. It receives post-RoPE q and the layer's
  whole KV cache ``[B, Hkv, S, D]`` after transformers wrote the new token.
* pre-RoPE q and k are captured by forward hooks: on ``q_norm``/``k_norm`` in Qwen3 (their
  outputs are the normed heads the gate was trained on), on ``q_proj``/``k_proj`` (bias
  included) in Qwen2 and Llama.
* a forward pre-hook on the decoder stack notices a new cache object (a new sequence).

A forward of several tokens (or the first forward on a new cache) is a prefill: dense
SDPA, then each layer's :class:`~seerattn_r.cache.GateCache` is built from the prompt's
pre-RoPE keys. A one-token forward is a decode step: the first layer builds the
:class:`~seerattn_r.cache.DecodePlan`; every layer appends its new key to its gate cache,
selects blocks (gate, oracle or Quest) and runs :func:`seerattn_r.ops.sparse_decode` on
``cache.transpose(1, 2)`` views of the KV cache (no copy, no host sync).

Left-padded batches (what ``generate`` builds) need position ids counted from each row's
first real token, which ``generate`` passes: a row's offset is the prompt length minus its
real length, and its blocks start at its first real token.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from seerattn_r import ops
from seerattn_r.backend import use_backend
from seerattn_r.baselines import oracle_block_scores, quest_block_scores
from seerattn_r.cache import DecodePlan, GateCache
from seerattn_r.config import SparseDecodeConfig
from seerattn_r.gate import AttnGate, GateRotary, attention_shape
from seerattn_r.ops._checks import HEAD_DIMS

ATTN_NAME = "seerattn"


@dataclass(frozen=True)
class _Arch:
    q_module: str
    k_module: str


# model_type -> which submodules of the attention give the pre-RoPE q and k.
SUPPORTED = {
    "qwen3": _Arch("q_norm", "k_norm"),
    "qwen2": _Arch("q_proj", "k_proj"),
    "llama": _Arch("q_proj", "k_proj"),
}


class Runtime:
    """The per-model state of a patched model (``model._seerattn``).

    Attributes:
        config: the :class:`SparseDecodeConfig`.
        gates: the per-layer :class:`AttnGate` (also registered as ``self_attn.attn_gate``).
        layers: per-layer :class:`GateCache` of the current sequence (None before prefill).
        offsets: ``[B]`` int32 KV-cache index of each row's first real token.
        plan: the current decode step's :class:`DecodePlan`.
        stats: ``[num_layers, 3]`` float64 device accumulators: KV tokens read (averaged
            over heads), KV tokens present, decode row-steps. See :func:`sparsity_stats`.
    """

    def __init__(self, config: SparseDecodeConfig, gates: list[AttnGate], previous_attn: str,
                 requires_grad: dict[str, bool]) -> None:
        self.config = config
        self.gates = gates
        self.num_layers = len(gates)
        self.dense_layers = frozenset(config.dense_layers)
        # What unpatch_model restores.
        self.previous_attn = previous_attn
        self.requires_grad = requires_grad
        self.handles: list = []
        self.stats: torch.Tensor | None = None
        # Filled by the capture hooks, which hold these very dicts: clear, never rebind.
        self.q_pre: dict[int, torch.Tensor] = {}
        self.k_pre: dict[int, torch.Tensor] = {}
        self.reset(None)

    def reset(self, cache) -> None:
        """Forget the current sequence (a new cache object begins a new one)."""
        self.cache_ref = weakref.ref(cache) if cache is not None else None
        self.active = cache is not None
        self.layers: list[GateCache | None] = [None] * self.num_layers
        self.offsets: torch.Tensor | None = None
        self.prompt_seqlens: torch.Tensor | None = None
        self.plan: DecodePlan | None = None
        self.q_pre.clear()
        self.k_pre.clear()

    def reset_stats(self) -> None:
        self.stats = None

    def memory_bytes(self) -> int:
        """Bytes held by the gate caches of the current sequence."""
        return sum(c.memory_bytes() for c in self.layers if c is not None)


def _runtime(module: nn.Module) -> Runtime:
    return module._seerattn_runtime


def _backend_scope(name: str | None):
    # Inside torch.compile the backend is read when the compiled step runs (see config).
    if name is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return use_backend(name)


def _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _row_positions(kwargs: dict, batch: int, q_len: int, device) -> torch.Tensor:
    pos = kwargs.get("position_ids")
    if pos is None:
        raise ValueError(
            "seerattn attention needs position_ids from the model (transformers passes them to "
            "the attention function); this model/version does not"
        )
    return pos.to(device).expand(batch, q_len)


def seerattn_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``query [B, Hq, T, D]`` post-RoPE, ``key``/``value``
    ``[B, Hkv, S, D]`` the layer's cache) -> ``([B, T, Hq, Dv], None)``."""
    rt = getattr(module, "_seerattn_runtime", None)
    if rt is None or not rt.active:
        return _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    layer = module.layer_idx
    with _backend_scope(rt.config.backend):
        if query.shape[2] > 1 or rt.layers[layer] is None:
            out = _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs)
            _prefill_layer(rt, layer, query, key, kwargs)
            return out
        return _decode_layer(rt, module, layer, query, key, value, attention_mask, scaling, dropout, kwargs)


def _prefill_layer(rt: Runtime, layer: int, query, key, kwargs) -> None:
    cfg = rt.config
    batch, _, s, _ = query.shape
    if layer == 0:
        pos = _row_positions(kwargs, batch, s, query.device)
        seqlens = (pos[:, -1] + 1).to(torch.int32)
        # Left padding: the prompt's real tokens are its last `seqlens` ones.
        rt.offsets = (s - seqlens).to(torch.int32)
        rt.prompt_seqlens = seqlens
        if cfg.collect_stats and (rt.stats is None or rt.stats.device != query.device):
            rt.stats = torch.zeros(rt.num_layers, 3, dtype=torch.float64, device=query.device)
    k_pre = rt.k_pre.pop(layer)
    rt.q_pre.pop(layer, None)
    capacity = -(-key.shape[2] // cfg.block_size)
    # fused=True here and below: the decode path is inference only, and the fused gate ops
    # (one kernel each on a GPU) give the same entries in prefill and decode.
    rt.layers[layer] = GateCache.prefill(
        rt.gates[layer], k_pre, rt.prompt_seqlens, rt.offsets, cfg.block_size, capacity, fused=True
    )


def _select(rt: Runtime, layer: int, q_pre, q, k_view, cache: GateCache, plan: DecodePlan, scaling) -> torch.Tensor:
    cfg = rt.config
    bs = cfg.block_size
    if cfg.selection == "gate":
        # Scores and selection fused: the probabilities are never written (same result).
        q_gate = rt.gates[layer].project_q(q_pre, plan.positions, fused=True)
        idx = ops.gate_select(q_gate, cache.keys, plan.last, plan.seqlens, bs, cfg.selection_budget, cfg.threshold,
                              cfg.sink_block)
    else:
        if cfg.selection == "oracle":
            scores = oracle_block_scores(q, k_view, plan.seqlens, bs, scaling, plan.offsets)
        else:
            scores = quest_block_scores(q, k_view, plan.seqlens, bs, plan.offsets)
        idx = ops.select_blocks(scores, plan.last, plan.seqlens, bs, cfg.selection_budget, cfg.threshold,
                                cfg.sink_block)
    # Rows still under min_sparse_length read every block (a device mask, no branch).
    width = max(idx.shape[-1], cfg.dense_blocks)
    if width > idx.shape[-1]:
        idx = torch.nn.functional.pad(idx, (0, width - idx.shape[-1]), value=-1)
    every = torch.arange(width, dtype=torch.int32, device=idx.device)
    return torch.where(plan.dense[:, None, None], every, idx)


def _record(rt: Runtime, layer: int, idx: torch.Tensor, plan: DecodePlan) -> None:
    bs = rt.config.block_size
    j = idx.long()
    tokens = (plan.seqlens.long()[:, None, None] - j * bs).clamp(0, bs).masked_fill(j < 0, 0)
    read = tokens.sum(-1).double().mean(-1).sum()
    seqlens = plan.seqlens.double()
    rt.stats[layer] += torch.stack([read, seqlens.sum(), torch.ones_like(seqlens).sum()])


def _decode_layer(rt, module, layer, query, key, value, attention_mask, scaling, dropout, kwargs):
    cfg = rt.config
    batch = query.shape[0]
    if layer == 0:
        pos = _row_positions(kwargs, batch, 1, query.device)[:, -1]
        rt.plan = DecodePlan.build(pos, rt.offsets, cfg.block_size, cfg.dense_until)
    plan = rt.plan
    cache = rt.layers[layer]
    cache.reserve(-(-key.shape[2] // cfg.block_size))
    q_pre = rt.q_pre.pop(layer)[:, -1]
    cache.append(rt.gates[layer], rt.k_pre.pop(layer)[:, -1], plan, fused=True)
    if layer in rt.dense_layers:
        return _dense(module, query, key, value, attention_mask, scaling, dropout, kwargs)
    q = query[:, :, -1]
    # [B, Hkv, S, D] -> [B, S, Hkv, D] views: the kernels take strides, never a copy.
    k_view, v_view = key.transpose(1, 2), value.transpose(1, 2)
    idx = _select(rt, layer, q_pre, q, k_view, cache, plan, scaling)
    out = ops.sparse_decode(q, k_view, v_view, plan.seqlens, idx, cfg.block_size, scaling, plan.offsets)
    if cfg.collect_stats:
        _record(rt, layer, idx, plan)
    return out[:, None], None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, seerattn_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _capture_hook(store: dict, layer: int, head_dim: int):
    def hook(module, args, output):
        # [B, T, H*D] (projections) or [B, T, H, D] (Qwen3 norms) -> [B, T, H, D]
        store[layer] = output.view(*output.shape[:2], -1, head_dim)

    return hook


def capture_pre_rope(model: nn.Module, q_store: dict, k_store: dict, user: str = "patch_model") -> list:
    """Forward hooks that put each attention layer's pre-RoPE query and key,
    ``[B, T, H, D]``, in ``q_store[layer]`` / ``k_store[layer]`` at every forward (the
    decode path, the training teacher and the one-pass evaluation all read them there).

    Returns the hook handles; ``remove()`` them to undo. ``user`` names the caller in the
    error for an unsupported model type.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"{user} supports model types {', '.join(sorted(SUPPORTED))}; got {model_type!r} "
            f"({type(model).__name__})"
        )
    arch = SUPPORTED[model_type]
    handles = []
    for i, layer in enumerate(_decoder(model).layers):
        attn = layer.self_attn
        handles.append(getattr(attn, arch.q_module).register_forward_hook(_capture_hook(q_store, i, attn.head_dim)))
        handles.append(getattr(attn, arch.k_module).register_forward_hook(_capture_hook(k_store, i, attn.head_dim)))
    return handles


def cache_argument(module: nn.Module) -> str:
    """The name under which ``module.forward`` (a ``*ForCausalLM`` or its decoder) takes the
    KV cache: ``"cache"`` from transformers 5.24, which deprecated ``"past_key_values"``
    (still accepted alone, ignored when both are given), else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _decoder(model: nn.Module) -> nn.Module:
    base = getattr(model, "model", model)
    if not hasattr(base, "layers"):
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers")
    return base


def _build_gate_modules(model, config: SparseDecodeConfig, gates) -> list[AttnGate]:
    from seerattn_r.checkpoint import canonical_state_dict, check_gates, expected_shapes, load_gates

    layers, hq, hkv, d = attention_shape(model.config)
    gate_dim = config.gate_dim
    state = None
    if isinstance(gates, (nn.ModuleList, list, tuple)):
        state = {f"{i}.{k}": v for i, g in enumerate(gates) for k, v in g.state_dict().items()}
        gate_dim = gates[0].gate_dim if len(gates) else gate_dim
    elif isinstance(gates, dict):
        state = gates
    elif gates is not None:
        state, gcfg = load_gates(gates)
        if gcfg["seerattn_gate_block_size"] != config.block_size:
            raise ValueError(
                f"gates at {str(gates)!r} were trained with block size {gcfg['seerattn_gate_block_size']}, "
                f"config.block_size is {config.block_size}"
            )
        gate_dim = gcfg["seerattn_gate_hidden_size"]
    if state is not None:
        state = canonical_state_dict(state)
        if gates is not None and not isinstance(gates, (nn.ModuleList, list, tuple)):
            gate_dim = next(v.shape[-1] for k, v in state.items() if k.endswith("attngate_qnorm.weight"))
        check_gates(state, expected_shapes(layers, hkv, hq // hkv, d, gate_dim),
                    f"{type(model).__name__} ({layers} layers, {hq}/{hkv} heads, head dim {d})")
    rope = GateRotary.from_model_config(model.config, gate_dim)
    ref = next(model.parameters())
    built = []
    for i in range(layers):
        gate = AttnGate(hkv, hq // hkv, d, gate_dim, rope)
        if state is not None:
            prefix = f"model.layers.{i}.self_attn.attn_gate."
            gate.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        built.append(gate.to(device=ref.device, dtype=ref.dtype))
    return built


def patch_model(model: nn.Module, config: SparseDecodeConfig, gates=None) -> nn.Module:
    """Make a transformers decoder decode sparsely with SeerAttention-R gates.

    Args:
        model: a ``Qwen3ForCausalLM``, ``Qwen2ForCausalLM`` or ``LlamaForCausalLM`` (or
            their base models). Its weights are frozen (``requires_grad=False``) and left
            untouched.
        config: :class:`SparseDecodeConfig`.
        gates: a gate directory (ours or the published layout, see
            :mod:`seerattn_r.checkpoint`), a state dict in that key layout, a list /
            ``nn.ModuleList`` of :class:`AttnGate`, or None for freshly initialised gates
            (``config.gate_dim``). Loaded gates are checked against the model's shapes.

    Returns:
        ``model``, patched in place: each ``self_attn`` gains an ``attn_gate`` submodule
        (cast to the model's dtype and device), ``config._attn_implementation`` becomes
        ``"seerattn"``. Prefill stays dense; each decode step runs gate -> select ->
        sparse decode. Undo with :func:`unpatch_model`.
    """
    if not isinstance(config, SparseDecodeConfig):
        raise TypeError(f"config must be a SparseDecodeConfig, got {type(config).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(
            f"patch_model supports model types {', '.join(sorted(SUPPORTED))}; got {model_type!r} "
            f"({type(model).__name__})"
        )
    if getattr(model, "_seerattn", None) is not None:
        raise ValueError("model is already patched; call unpatch_model(model) first")
    base = _decoder(model)
    head_dim = attention_shape(model.config)[3]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"the sparse decode kernels take head dims {HEAD_DIMS}; the model's is {head_dim}")
    bad = [i for i in config.dense_layers if not 0 <= i < len(base.layers)]
    if bad:
        raise ValueError(f"dense_layers {bad} out of range for a model with {len(base.layers)} layers")
    if config.backend is not None:
        from seerattn_r import backend as _backend

        _backend.resolve_name(next(model.parameters()).device, config.backend)
    gate_modules = _build_gate_modules(model, config, gates)
    rt = Runtime(config, gate_modules, model.config._attn_implementation,
                 {name: p.requires_grad for name, p in model.named_parameters()})
    for p in model.parameters():
        p.requires_grad_(False)
    for i, layer in enumerate(base.layers):
        attn = layer.self_attn
        attn.attn_gate = gate_modules[i]
        attn._seerattn_runtime = rt
    rt.handles.extend(capture_pre_rope(model, rt.q_pre, rt.k_pre))
    cache_arg = cache_argument(base)

    def new_sequence(module, args, kwargs):
        # A compiled step is a decode step by contract: nothing to reset there.
        if torch.compiler.is_compiling():
            return None
        cache = kwargs.get(cache_arg)
        if cache is None:  # the deprecated name, passed alone
            cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        if cache is None and (use_cache if use_cache is not None else module.config.use_cache):
            # The model would build this cache itself, out of our sight; build it here so
            # the next call, which passes it back, is recognised as the same sequence.
            from transformers import DynamicCache

            cache = kwargs[cache_arg] = DynamicCache(config=module.config)
        current = rt.cache_ref() if rt.cache_ref is not None else None
        if cache is None or cache is not current:
            rt.reset(cache)
        return args, kwargs

    rt.handles.append(base.register_forward_pre_hook(new_sequence, with_kwargs=True))
    _register_attention()
    model.config._attn_implementation = ATTN_NAME
    model._seerattn = rt
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`: remove gates and hooks, restore the attention
    implementation and the parameters' ``requires_grad``. Returns ``model``."""
    rt = getattr(model, "_seerattn", None)
    if rt is None:
        raise ValueError("model is not patched by seerattn_r.patch_model")
    for h in rt.handles:
        h.remove()
    for layer in _decoder(model).layers:
        del layer.self_attn.attn_gate
        del layer.self_attn._seerattn_runtime
    model.config._attn_implementation = rt.previous_attn
    for name, p in model.named_parameters():
        p.requires_grad_(rt.requires_grad.get(name, p.requires_grad))
    del model._seerattn
    return model


def sparsity_stats(model: nn.Module, reset: bool = False) -> dict:
    """Per-layer block statistics of the decode steps since patching (or the last reset).

    Returns:
        ``{"layers": [{"layer", "density", "sparsity", "tokens_read", "tokens"}...],
        "density": overall, "sparsity": overall, "row_steps": decode steps x rows}``, where
        density is the fraction of the KV cache read (averaged over heads) and dense layers
        have no entry. One device-to-host copy, so call it after generating.
    """
    rt = getattr(model, "_seerattn", None)
    if rt is None:
        raise ValueError("model is not patched by seerattn_r.patch_model")
    rows, total_read, total = [], 0.0, 0.0
    stats = rt.stats.cpu().tolist() if rt.stats is not None else [[0.0, 0.0, 0.0]] * rt.num_layers
    for i, (read, tokens, _) in enumerate(stats):
        if i in rt.dense_layers:
            continue
        density = read / tokens if tokens else float("nan")
        rows.append({"layer": i, "density": density, "sparsity": 1.0 - density,
                     "tokens_read": read, "tokens": tokens})
        total_read, total = total_read + read, total + tokens
    density = total_read / total if total else float("nan")
    out = {"layers": rows, "density": density, "sparsity": 1.0 - density,
           "row_steps": int(max((s[2] for s in stats), default=0))}
    if reset:
        rt.reset_stats()
    return out
