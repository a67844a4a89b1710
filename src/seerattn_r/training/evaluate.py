"""Held-out evaluation of trained gates: KL to the target and attention recall.

Recall of a selection at a position is the share of the true attention mass (softmax
probabilities summed over each selected block's keys, the current partial block
included) inside the selected blocks, averaged over query heads and positions. Every
method gets the same forced blocks (block 0 and the current block) and the decode rule
that only blocks strictly before the current one are scored:

* ``gate``: the trained gate's probabilities, top ``budget // block_size`` per KV head;
* ``oracle``: the true block-max attention (the training target), per KV head;
* ``quest``: Quest's per-query-head bound on post-RoPE keys (at least 3 blocks).

Positions are the last ``loss_slice_ratio`` of each sequence (every ``stride``-th).
The true attention is computed in chunks of query positions, never ``S x S`` at once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seerattn_r.baselines import quest_block_bounds
from seerattn_r.config import QUEST_MIN_BLOCKS
from seerattn_r.ops.select_blocks import select_blocks
from seerattn_r.training.data import PackedRow
from seerattn_r.training.loss import loss_rows, sequence_gate_logits
from seerattn_r.training.teacher import LayerTensors
from seerattn_r.training.trainer import row_layer_kl

METHODS = ("gate", "oracle", "quest")
BUDGETS = (1024, 2048, 4096, 8192)
_CHUNK = 256


def _block_mass(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, block_size: int, sm_scale: float):
    """``[P, Hq, nbt]`` fp32 attention mass per key block of the queries at ``positions``
    (``q [P, Hq, D]``, ``k [L, Hkv, D]`` post-RoPE; ``nbt = ceil(L / block_size)``)."""
    length, hkv, _ = k.shape
    group = q.shape[1] // hkv
    nbt = math.ceil(length / block_size)
    keys = k.float().repeat_interleave(group, dim=1)  # [L, Hq, D]
    out = []
    for lo in range(0, q.shape[0], _CHUNK):
        qc, pc = q[lo : lo + _CHUNK].float(), positions[lo : lo + _CHUNK]
        logits = torch.einsum("phd,lhd->phl", qc, keys) * sm_scale
        causal = torch.arange(length, device=k.device)[None, :] <= pc[:, None]
        probs = logits.masked_fill(~causal[:, None], float("-inf")).softmax(-1)
        probs = nn.functional.pad(probs, (0, nbt * block_size - length))
        out.append(probs.view(*probs.shape[:2], nbt, block_size).sum(-1))
    return torch.cat(out)


def _recall(mass: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Sum over (position, query head) of the mass ``[P, Hq, nbt]`` inside the selected
    blocks ``[P, H, M]`` (``H`` = Hq, or Hkv shared by each group; -1 padding)."""
    nbt = mass.shape[-1]
    selected = torch.zeros(*indices.shape[:2], nbt + 1, dtype=torch.bool, device=mass.device)
    selected.scatter_(-1, torch.where(indices < 0, nbt, indices).long(), True)
    selected = selected[..., :nbt].repeat_interleave(mass.shape[1] // indices.shape[1], dim=1)
    return (mass * selected).sum()


class _Accumulator:
    def __init__(self, num_layers: int, budgets: tuple[int, ...]) -> None:
        self.recall = {m: torch.zeros(num_layers, len(budgets), dtype=torch.float64) for m in METHODS}
        self.terms = torch.zeros(num_layers, dtype=torch.float64)


def _evaluate_layer(acc, gate, t: LayerTensors, row: PackedRow, block_size, budgets, ratio, stride) -> None:
    """Add one layer's recall sums of every sequence of ``row`` into ``acc``."""
    hq, hkv = t.q.shape[2], t.k.shape[2]
    for start, end in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:]):
        length = end - start
        first = loss_rows(length, block_size, ratio)
        if first >= length:
            continue
        device = t.q.device
        positions = torch.arange(first, length, stride, device=device)
        nbt = math.ceil(length / block_size)
        logits, _ = sequence_gate_logits(gate, t.q_pre[0, start:end], t.k_pre[0, start:end], first, block_size)
        rows = positions - first
        pad = nbt - logits.shape[-1]
        scores = {
            "gate": nn.functional.pad(logits[:, rows].softmax(-1).nan_to_num(0.0), (0, pad)),
            "oracle": t.target[0, :, start + positions, :nbt],
        }
        k_seq = t.k[0, start:end]
        seqlen = torch.tensor([length], dtype=torch.int32, device=device)
        kmin, kmax = quest_block_bounds(k_seq[None], seqlen, block_size)  # [1, nbt, Hkv, D]
        qg = t.q[0, start + positions].float().view(len(positions), hkv, hq // hkv, -1)
        # sum_d max(q_d kmin_d, q_d kmax_d) = q+ . kmax + q- . kmin: two matmuls, no [P, N, H, D].
        bound = torch.einsum("phgd,nhd->phgn", qg.clamp(min=0), kmax[0].float()) + torch.einsum(
            "phgd,nhd->phgn", qg.clamp(max=0), kmin[0].float()
        )
        scores["quest"] = bound.flatten(1, 2)  # [P, Hq, nbt]
        scores["gate"] = scores["gate"].permute(1, 0, 2).contiguous()
        scores["oracle"] = scores["oracle"].permute(1, 0, 2).contiguous()

        mass = _block_mass(t.q[0, start + positions], k_seq, positions, block_size, t.sm_scale)
        num_blocks = (positions // block_size).to(torch.int32)
        cache_seqlens = (positions + 1).to(torch.int32)
        for b, budget in enumerate(budgets):
            for method in METHODS:
                blocks = budget // block_size
                if method == "quest":
                    blocks = max(blocks, QUEST_MIN_BLOCKS)
                idx = select_blocks(scores[method].float(), num_blocks, cache_seqlens, block_size,
                                    token_budget=blocks * block_size)
                acc.recall[method][t.layer_idx, b] += float(_recall(mass, idx))
        acc.terms[t.layer_idx] += len(positions) * hq


@torch.no_grad()
def evaluate_gates(
    model: nn.Module,
    gates: nn.ModuleList,
    rows: list[PackedRow],
    block_size: int,
    budgets: tuple[int, ...] = BUDGETS,
    loss_slice_ratio: float = 0.5,
    stride: int = 1,
) -> dict:
    """Per-layer KL to the target and attention recall of gate, oracle and Quest.

    Args:
        model: the frozen transformers model.
        gates: its gates (``nn.ModuleList``, on the model's device).
        rows: held-out packed rows (:class:`~seerattn_r.training.data.PackedRow`).
        block_size: the gates' block size.
        budgets: token budgets.
        loss_slice_ratio: evaluate the last this fraction of each sequence's positions.
        stride: evaluate every ``stride``-th of those positions.

    Returns:
        ``{"block_size", "budgets", "layers": [{"layer", "kl", "recall": {method: {budget:
        value}}}], "mean": {"kl", "recall": {...}}}`` (plain floats, JSON-ready).
    """
    acc = _Accumulator(len(gates), tuple(budgets))
    kl = torch.zeros(len(gates), dtype=torch.float64)
    for row in rows:
        def on_layer(t: LayerTensors, row=row) -> None:
            _evaluate_layer(acc, gates[t.layer_idx], t, row, block_size, budgets, loss_slice_ratio, stride)

        kl += row_layer_kl(model, gates, row, block_size, loss_slice_ratio, on_layer=on_layer).double().cpu()
    kl /= max(len(rows), 1)
    terms = acc.terms.clamp_min(1)[:, None]
    recall = {m: (acc.recall[m] / terms) for m in METHODS}
    layers = [
        {"layer": i, "kl": float(kl[i]),
         "recall": {m: {str(b): float(recall[m][i, j]) for j, b in enumerate(budgets)} for m in METHODS}}
        for i in range(len(gates))
    ]
    mean = {"kl": float(kl.mean()),
            "recall": {m: {str(b): float(recall[m][:, j].mean()) for j, b in enumerate(budgets)} for m in METHODS}}
    return {"block_size": block_size, "budgets": list(budgets), "layers": layers, "mean": mean}


def format_table(result: dict) -> str:
    """The result of :func:`evaluate_gates` as a text table (one line per layer + mean)."""
    budgets = [str(b) for b in result["budgets"]]
    head = ["layer", "KL"] + [f"{m}@{b}" for b in budgets for m in METHODS]
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for entry in [*result["layers"], {"layer": "mean", **result["mean"]}]:
        cells = [str(entry["layer"]), f"{entry['kl']:.4f}"]
        cells += [f"{entry['recall'][m][b]:.4f}" for b in budgets for m in METHODS]
        lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)
