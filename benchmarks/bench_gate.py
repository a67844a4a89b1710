"""What choosing the blocks costs, against the sparse decode it feeds.

Per grid point (the bench_decode grid; Dg = 128 by default) and per seerattn backend,
one attention layer's decode step is split into:

* ``select``: what the decode path runs, the gate query (``AttnGate.project_q``: ``[B, Hq,
  D]`` x ``Wq [Hkv, g, D, Dg]``, RMSNorm, RoPE) + ``ops.gate_select`` (scores over the
  layer's compression cache and the top blocks for token budget ``round((1 - sparsity) *
  Nblk) * block_size``, fused); its parts are also timed alone (``qproj``,
  ``scores_topk``: the fused op, and ``scores``, ``topk``: ``ops.gate_scores`` and
  ``ops.select_blocks`` separately, the same result: ``fused_select_equal``);
* ``update``: the compression-cache update, ``GateCache.append``, at a step where every
  row completes a block (write the new pre-RoPE key into the recent-K buffer, pool the
  block, project, norm, RoPE, write the entry); ``update_idle``: the same call at a step
  where no row completes one (only the key is written). The integration calls it at
  *every* step (no host sync decides whether a block completed);
* ``attn``: ``ops.sparse_decode`` over the selected blocks (budget + sink + last block);
* ``step``: the layer's whole sparse attention step at an idle step, as decoding runs it:
  ``select``, ``update_idle`` and ``attn`` of the blocks just selected, in one call (one
  CUDA graph). Timed alone, each small kernel pays a graph launch and the L2 flush's cold
  start; inside one graph the launches overlap the previous kernel's tail.

Everything runs under ``torch.no_grad`` as in decoding, so on a GPU the gate takes its
fused path (``ops.gate_project_q``, ``ops.gate_cache_append``: one kernel each);
``qproj_unfused`` and ``update_unfused`` time the torch code (``fused=False``) beside it.

``gate_share`` = (select + update) / (select + update + attn): the gate's share of the
layer's decode time at a step that completes blocks; ``gate_share_amortised`` charges
the update as ``update_idle + (update - update_idle) / block_size``, what it costs per
step on average (``update / block_size`` where ``update_idle`` is missing). Both use
CUDA-graph replay times (a decode step runs from a graph), eager where there is no GPU;
``*_eager`` variants use eager times. The gate's outputs are checked against
``seerattn_r.reference`` (``scores_relerr``, ``select_equal``: the selected indices are
identical) and the fused query and update against the torch code (``qproj_relerr``,
``update_relerr``). Random weights and caches: the cost does not depend on the values.

    python benchmarks/bench_gate.py --quick --out $OUT/gate.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from seerattn_r import backend as sbackend  # noqa: E402
from seerattn_r import ops, reference  # noqa: E402
from seerattn_r.cache import DecodePlan, GateCache  # noqa: E402
from seerattn_r.gate import AttnGate  # noqa: E402

KEY_FIELDS = ["batch", "tokens", "sparsity", "dtype", "block_size", "hq", "hkv", "head_dim", "gate_dim"]
PARTS = ("qproj", "scores", "topk", "scores_topk", "select", "update", "update_idle", "attn", "step")
# Estimate printed before the grid: a dozen small timings and one sparse decode per
# point and backend.
EST_POINT_S = 6.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_grid_args(p)
    p.add_argument("--gate-dim", type=int, default=128)
    return C.finish_grid_args(p, p.parse_args(argv))


class Layer:
    """One attention layer's decode-step state at a grid point: the pre-RoPE query, the
    KV cache, the gate and its cache, the step's plan."""

    def __init__(self, args, batch: int, tokens: int, dtype: torch.dtype, device: torch.device,
                 gen: torch.Generator):
        bs, hq, hkv, d, dg = args.block_size, args.hq, args.hkv, args.head_dim, args.gate_dim

        def randn(*shape):
            return torch.randn(*shape, dtype=dtype, device=device, generator=gen)

        self.block_size = bs
        self.q = randn(batch, hq, d)
        self.k_new = randn(batch, hkv, d)
        self.k_cache = randn(batch, tokens, hkv, d)
        self.v_cache = randn(batch, tokens, hkv, d)
        self.nblk = math.ceil(tokens / bs)
        self.gate = AttnGate(hkv, hq // hkv, d, dg).to(device=device, dtype=dtype)
        # Every row at its last token, so `last` = nblk - 1 blocks are scored and the
        # step completes a block (the update's masked write keeps its entry).
        positions = torch.full((batch,), tokens - 1, dtype=torch.long, device=device)
        offsets = torch.zeros(batch, dtype=torch.int32, device=device)
        self.plan = DecodePlan.build(positions, offsets, bs, dense_until=0)
        # The step before: the same blocks are scored, no row completes one.
        self.idle_plan = DecodePlan.build(positions - 1, offsets, bs, dense_until=0)
        self.cache = GateCache(randn(batch, self.nblk, hkv, dg), randn(batch, bs, hkv, d))

    def qproj(self, fused: bool | None = None) -> torch.Tensor:
        return self.gate.project_q(self.q, self.plan.positions, fused=fused)

    def scores(self, q_gate: torch.Tensor) -> torch.Tensor:
        return ops.gate_scores(q_gate, self.cache.keys, self.plan.last)

    def topk(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        return ops.select_blocks(scores, self.plan.last, self.plan.seqlens, self.block_size, token_budget=budget)

    def fused_select(self, q_gate: torch.Tensor, budget: int) -> torch.Tensor:
        return ops.gate_select(q_gate, self.cache.keys, self.plan.last, self.plan.seqlens, self.block_size,
                               token_budget=budget)

    def select(self, budget: int) -> torch.Tensor:
        """What the decode path runs: the query, then scores and selection fused."""
        return self.fused_select(self.qproj(), budget)

    def update(self, idle: bool = False, fused: bool | None = None) -> None:
        self.cache.append(self.gate, self.k_new, self.idle_plan if idle else self.plan, fused=fused)

    def attn(self, idx: torch.Tensor) -> torch.Tensor:
        return ops.sparse_decode(self.q, self.k_cache, self.v_cache, self.plan.seqlens, idx, self.block_size)

    def step(self, budget: int) -> torch.Tensor:
        """The layer's sparse attention at an idle decode step: choose, update, attend."""
        idx = self.select(budget)
        self.update(idle=True)
        return self.attn(idx)


def check_update(layer: Layer) -> float:
    """Relative error of the completed entries written by ``GateCache.append`` (the
    current backend and path) against the torch code's, on copies of the cache."""
    entries = []
    for fused in (None, False):
        cache = GateCache(layer.cache.keys.clone(), layer.cache.recent.clone())
        cache.append(layer.gate, layer.k_new, layer.plan, fused=fused)
        entries.append(cache.keys[:, layer.nblk - 1])
    return C.relerr(entries[1], entries[0])


def check(row: dict, layer: Layer, budget: int, name: str) -> torch.Tensor | None:
    """The gate's query, cache update, scores and selection under backend ``name`` against
    the torch code and the references, into ``row``; returns the selection (None if it
    failed)."""
    try:
        with sbackend.use_backend(name):
            q_gate = layer.qproj()
            scores = layer.scores(q_gate)
            idx = layer.topk(scores, budget)
            row[f"{name}_fused_select_equal"] = bool(torch.equal(layer.fused_select(q_gate, budget), idx))
            row[f"{name}_update_relerr"] = C.clean_float(check_update(layer))
    except Exception as exc:  # noqa: BLE001 - a failing backend is data
        row[f"{name}_err"] = C.short_error(exc)
        return None
    row[f"{name}_qproj_relerr"] = C.clean_float(C.relerr(layer.qproj(fused=False), q_gate))
    ref_scores = reference.gate_scores(q_gate, layer.cache.keys, layer.plan.last, 1.0 / math.sqrt(q_gate.shape[-1]))
    ref_idx = reference.select_blocks(scores, layer.plan.last, layer.plan.seqlens, layer.block_size, budget, None, True)
    row[f"{name}_scores_relerr"] = C.clean_float(C.relerr(ref_scores, scores))
    row[f"{name}_select_equal"] = bool(torch.equal(ref_idx, idx))
    row[f"{name}_blocks_read"] = int((idx >= 0).sum(-1).float().mean().item())
    return idx


def point(row: dict, layer: Layer, backends: dict, device: torch.device, graph: bool) -> str:
    """Time every part under every backend into ``row``; returns the progress text."""
    budget = row["token_budget"]
    text = []
    for name, why_not in backends.items():
        if why_not is not None:
            row[f"{name}_err"] = why_not
            continue
        idx = check(row, layer, budget, name)
        if idx is None:
            continue
        q_gate = layer.qproj()
        scores = layer.scores(q_gate)
        calls = {
            "qproj": layer.qproj,
            "scores": lambda: layer.scores(q_gate),
            "topk": lambda: layer.topk(scores, budget),
            "scores_topk": lambda: layer.fused_select(q_gate, budget),
            "select": lambda: layer.select(budget),
            "update": layer.update,
            "update_idle": lambda: layer.update(idle=True),
            "attn": lambda: layer.attn(idx),
            "step": lambda: layer.step(budget),
            "qproj_unfused": lambda: layer.qproj(fused=False),
            "update_unfused": lambda: layer.update(fused=False),
        }
        for part, fn in calls.items():
            def run(fn=fn, name=name):
                with sbackend.use_backend(name):
                    return fn()

            C.measure(row, f"{name}_{part}", run, device, graph)
        text.append(shares(row, name, layer.block_size))
        C.free_memory(device)
    return " | ".join(text)


def shares(row: dict, name: str, block_size: int) -> str:
    """Fill ``<name>_gate_share`` (graph times, eager where absent) and the amortised and
    eager variants; returns the progress text."""
    for suffix, mode in (("", "graph"), ("_eager", "eager")):
        def t(part):
            key = f"{name}_{part}"
            if mode == "graph" and row.get(f"{key}_graph_ms") is not None:
                return row[f"{key}_graph_ms"]
            return row.get(f"{key}_ms")

        sel, upd, idle, attn = t("select"), t("update"), t("update_idle"), t("attn")
        if None in (sel, upd, attn):
            continue
        row[f"{name}_gate_ms{suffix}"] = sel + upd
        row[f"{name}_gate_share{suffix}"] = (sel + upd) / (sel + upd + attn)
        # What a step completing a block adds over an idle one, spread over the block.
        # Floored at 0 (so amortised <= update): timing noise can put update_idle above
        # update (as on a CPU, where the torch path does the same work at every step).
        completing = None if idle is None else max(upd - idle, 0.0) / block_size
        amort = sel + (upd / block_size if idle is None else min(upd, idle + completing))
        row[f"{name}_gate_share_amortised{suffix}"] = amort / (amort + attn)
        step = t("step")
        if step is not None and completing is not None:
            row[f"{name}_gate_share_step{suffix}"] = (step - attn + completing) / (step + completing)
    if f"{name}_gate_share" not in row:
        errs = [k for k in row if k.startswith(name) and k.endswith("_err")]
        return f"{name} ERR ({','.join(errs)})"
    t = {p: row.get(f"{name}_{p}_graph_ms", row.get(f"{name}_{p}_ms")) for p in PARTS}
    ok = "" if row.get(f"{name}_select_equal") and row.get(f"{name}_fused_select_equal") else " SELECT!=REF"
    idle = "-" if t["update_idle"] is None else f"{t['update_idle'] * 1e3:.1f}"
    return (f"{name}: select {t['select'] * 1e3:.1f}us (q {t['qproj'] * 1e3:.1f} s {t['scores'] * 1e3:.1f} "
            f"k {t['topk'] * 1e3:.1f} fused s+k {t['scores_topk'] * 1e3:.1f}) update {t['update'] * 1e3:.1f}us (idle {idle}) "
            f"attn {t['attn'] * 1e3:.1f}us "
            f"share {row[f'{name}_gate_share']:.1%} (amortised {row[f'{name}_gate_share_amortised']:.1%}"
            + (f", in one graph {row[f'{name}_gate_share_step']:.1%} of step {t['step'] * 1e3:.1f}us"
               if f"{name}_gate_share_step" in row else "") + f"){ok}")


@torch.no_grad()  # as in decoding: the gate takes its fused path on a GPU
def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device, dtype, graph, backends, info, out = C.start_run(args, "gate", KEY_FIELDS)
    base = dict(dtype=args.dtype, block_size=args.block_size, hq=args.hq, hkv=args.hkv,
                head_dim=args.head_dim, gate_dim=args.gate_dim)
    skip = set() if args.redo else C.done_keys(args.out, KEY_FIELDS)
    todo = [
        (b, t, s) for t in args.tokens for b in args.batch for s in args.sparsity
        if (b, t, s, *base.values()) not in skip
    ]
    print(f"# {info.get('gpu') or info.get('cpu')} | backends {backends} | timer: {info['timer']}", flush=True)
    print(f"# {len(todo)} points ({len(skip)} already in {args.out}); rough estimate "
          f"{len(todo) * EST_POINT_S * max(1, len(backends)):.0f}s on a GPU", flush=True)
    progress = C.Progress(len(todo), args.max_seconds)
    gen = torch.Generator(device=device)
    results: list[dict] = []
    shape_done = None
    layer = None
    stopped = 0
    for batch, tokens, sparsity in todo:
        if progress.should_stop():
            stopped += 1
            continue
        if shape_done != (batch, tokens):
            layer = None
            C.free_memory(device)
            gen.manual_seed(args.seed)
            layer = Layer(args, batch, tokens, dtype, device, gen)
            shape_done = (batch, tokens)
        keep = max(1, round((1.0 - sparsity) * layer.nblk))
        row = dict(base, batch=batch, tokens=tokens, sparsity=sparsity, timer=info["timer"],
                   blocks=layer.nblk, token_budget=keep * args.block_size)
        text = point(row, layer, backends, device, graph)
        results.append(row)
        progress.line(f"B={batch} S={tokens} sp={sparsity} | {text}")
        C.write_results(out, "gate", info, results)
    C.finish_run(out, "gate", info, results, stopped)
    return results


if __name__ == "__main__":
    main()
