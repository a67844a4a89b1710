"""How much sparse decoding changes a model's predictions, measured teacher-forced.

For each held-out sequence, one dense forward is the reference; then, for each selection
method and token budget, one :func:`~seerattn_r.eval.onepass.one_pass_logits` forward in
which every position past ``eval_start`` decodes sparsely. Over the positions
``t = eval_start .. S-2`` (predicting token ``t + 1``):

* **loss / perplexity**: mean next-token cross entropy and its ``exp``;
  ``ppl_change = ppl / ppl_dense - 1``;
* **top-1 agreement**: the share of positions whose argmax equals the dense argmax;
* **kv_read**: tokens attended over tokens in the cache, summed over positions (the
  fraction of the KV cache a decode step reads; averaged over heads);
* **recall**: per layer, the dense attention mass (of that sparse pass's query, over all
  tokens ``<= t``) inside the selected tokens, averaged over query heads and positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from seerattn_r.config import SparseDecodeConfig
from seerattn_r.eval.onepass import LayerStats, one_pass_logits
from seerattn_r.gate import AttnGate

METHODS = ("gate", "oracle", "quest")
BUDGETS = (256, 512, 1024, 2048)


def _nll_top1(logits: torch.Tensor, input_ids: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll [B, R], argmax [B, R])`` of positions ``start .. S-2`` (fp32 logits)."""
    pred = logits[:, start:-1]
    target = input_ids[:, start + 1:].to(pred.device)
    nll = torch.nn.functional.cross_entropy(pred.transpose(1, 2), target, reduction="none")
    return nll, pred.argmax(-1)


def evaluate(
    model: nn.Module,
    sequences: Sequence[torch.Tensor],
    block_size: int,
    gates: Sequence[AttnGate] | None = None,
    methods: Sequence[str] = METHODS,
    budgets: Sequence[int] = BUDGETS,
    eval_start: int = 1024,
    chunk: int = 256,
    backend: str | None = "torch",
    on_run: Callable[[str, int, int], None] | None = None,
    on_sequence: Callable[[dict], None] | None = None,
) -> dict:
    """Fidelity of every (method, budget) pair on ``sequences``.

    Args:
        model: an unpatched ``Qwen3``/``Qwen2``/``Llama`` causal LM.
        sequences: ``[S]`` int64 token ids each (lengths may differ), on any device.
        block_size: tokens per KV block.
        gates: one :class:`AttnGate` per layer on the model's device; required when
            ``"gate"`` is in ``methods``.
        methods: selections among :data:`METHODS`.
        budgets: token budgets.
        eval_start: positions ``< eval_start`` decode densely and are not scored (the
            dense "first 1k tokens").
        chunk: query rows per attention chunk (see :func:`one_pass_logits`).
        backend: backend of the selection ops.
        on_run: called as ``on_run(method, budget, sequence index)`` before each forward
            (progress reporting).
        on_sequence: called with the result over the sequences done so far after each
            sequence (to save partial results of a run that may be cut short).

    Returns:
        ``{"dense": {"loss", "ppl"}, "runs": [{"method", "budget", "loss", "ppl",
        "ppl_change", "top1_agreement", "kv_read", "recall", "recall_per_layer",
        "kv_read_per_layer"}...], "positions", "sequences_done"}``.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods must be among {METHODS}, got {bad}")
    if "gate" in methods and gates is None:
        raise ValueError("method 'gate' needs gates")
    if not sequences:
        raise ValueError("sequences is empty")
    short = [len(s) for s in sequences if len(s) < eval_start + 2]
    if short:
        raise ValueError(f"sequences must hold at least eval_start + 2 = {eval_start + 2} tokens, got {short}")
    device = next(model.parameters()).device
    layers = model.config.num_hidden_layers
    pairs = [(m, b) for m in methods for b in budgets]
    nll_sum = {p: 0.0 for p in pairs}
    agree = {p: 0 for p in pairs}
    stats = {p: LayerStats.zeros(layers) for p in pairs}
    dense_nll, positions = 0.0, 0
    for i, seq in enumerate(sequences):
        ids = seq.to(device=device, dtype=torch.long)[None]
        if on_run is not None:
            on_run("dense", 0, i)
        logits, _ = one_pass_logits(model, ids, None, chunk=chunk, backend=backend)
        nll, ref_top1 = _nll_top1(logits, ids, eval_start)
        del logits
        dense_nll += nll.sum().item()
        positions += nll.numel()
        for method, budget in pairs:
            if on_run is not None:
                on_run(method, budget, i)
            cfg = SparseDecodeConfig(block_size=block_size, token_budget=budget, selection=method,
                                     min_sparse_length=eval_start)
            logits, st = one_pass_logits(model, ids, cfg, gates if method == "gate" else None,
                                         chunk=chunk, backend=backend)
            nll, top1 = _nll_top1(logits, ids, eval_start)
            del logits
            nll_sum[method, budget] += nll.sum().item()
            agree[method, budget] += (top1 == ref_top1).sum().item()
            stats[method, budget].add(st)
        result = _summary(pairs, dense_nll, positions, nll_sum, agree, stats)
        result["sequences_done"] = i + 1
        if on_sequence is not None:
            on_sequence(result)
    return result


def _summary(pairs, dense_nll: float, positions: int, nll_sum: dict, agree: dict, stats: dict) -> dict:
    dense_loss = dense_nll / positions
    runs = []
    for method, budget in pairs:
        st = stats[method, budget]
        loss = nll_sum[method, budget] / positions
        recall = (st.recall / st.heads.clamp(min=1)).tolist()
        read = (st.read / st.present.clamp(min=1)).tolist()
        runs.append({
            "method": method, "budget": budget, "loss": loss, "ppl": math.exp(loss),
            "ppl_change": math.exp(loss - dense_loss) - 1.0,
            "top1_agreement": agree[method, budget] / positions,
            "kv_read": st.read.sum().item() / max(st.present.sum().item(), 1.0),
            "recall": st.recall.sum().item() / max(st.heads.sum().item(), 1.0),
            "recall_per_layer": recall, "kv_read_per_layer": read,
        })
    return {"dense": {"loss": dense_loss, "ppl": math.exp(dense_loss)}, "runs": runs, "positions": positions}


def format_table(result: dict) -> str:
    """The runs of :func:`evaluate` as a markdown table."""
    lines = [f"dense perplexity {result['dense']['ppl']:.4f} over {result['positions']} positions", "",
             "| method | budget | KV read | recall | ppl | ppl change | top-1 agreement |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["runs"]:
        lines.append(f"| {r['method']} | {r['budget']} | {r['kv_read']:.1%} | {r['recall']:.1%} | "
                     f"{r['ppl']:.4f} | {r['ppl_change']:+.2%} | {r['top1_agreement']:.2%} |")
    return "\n".join(lines)
