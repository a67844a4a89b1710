"""The Triton gate kernels alone: ``gate_scores``, ``select_blocks`` and the fused
``gate_select``, against the bytes they must read.

Per (batch, tokens) point (Hkv 8, Dg 128, block 64, budget 10% of the blocks by default,
every row at its last token as in ``bench_gate.py``): the time of

* ``scores``: ``gate_scores`` (logits kernel + normalize kernel), with its read floor
  (k_gate's scored blocks / measured copy bandwidth) and the fraction of it reached;
* ``logits``: the logits kernel alone (what ``gate_select`` runs before selecting);
* ``topk``: ``select_blocks`` on the probabilities;
* ``scores_topk``: ``gate_scores`` then ``select_blocks``; ``fused``: ``gate_select``;

for each ``--programs-per-unit`` value of the chunk plan (the plan's knob:
``gate_scores.PROGRAMS_PER_UNIT``). CUDA-event medians with the L2 flushed before every
run (``--l2-flush``, clean by default; see ``_common``), eager and replayed from a CUDA
graph (``_common.measure``); each row's ``timer`` names the method. Each point first
checks the kernels against ``seerattn_r.reference`` (scores relative error, identical
selection, fused == unfused). CPU (Triton interpreter) only for a smoke run at toy sizes.

    python benchmarks/bench_gate_kernels.py --out $OUT/gate_kernels.json
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from seerattn_r import reference  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--tokens", default="32768,131072", help="comma-separated cache lengths")
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--gate-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--programs-per-unit", default="8", help="comma-separated plan knobs to sweep")
    p.add_argument("--no-graph", action="store_true", help="eager timings only")
    C.add_l2_flush_arg(p)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    C.set_l2_flush(args.l2_flush)
    return args


def point(args, batch: int, tokens: int, device: torch.device, dtype: torch.dtype, ppus: list[int]) -> list[dict]:
    from seerattn_r.kernels.triton import gate_scores as gs
    from seerattn_r.kernels.triton import gate_select as gsel
    from seerattn_r.kernels.triton import select_blocks as sb

    bs, hkv, dg = args.block_size, args.hkv, args.gate_dim
    nblk = math.ceil(tokens / bs)
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, hkv, dg, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch, nblk, hkv, dg, device=device, dtype=dtype, generator=gen)
    seqlens = torch.full((batch,), tokens, dtype=torch.int32, device=device)
    num = (seqlens - 1) // bs
    budget = max(1, round((1.0 - args.sparsity) * nblk)) * bs
    scale = dg**-0.5
    read_bytes = batch * int(num[0]) * hkv * dg * dtype.itemsize
    rows = []
    for ppu in ppus:
        gs.PROGRAMS_PER_UNIT = ppu
        chunks, chunk_blocks = gs.plan_chunks(device, batch * hkv, nblk, gs.blocks_per_tile(dg))
        row = dict(batch=batch, tokens=tokens, hkv=hkv, gate_dim=dg, block_size=bs, dtype=args.dtype,
                   sparsity=args.sparsity, timer=C.timer_name(device), token_budget=budget, blocks=nblk,
                   programs_per_unit=ppu, chunks=chunks, chunk_blocks=chunk_blocks, programs=batch * hkv * chunks,
                   read_bytes=read_bytes, floor_ms=C.floor_ms(read_bytes, device))
        probs = gs.gate_scores(q, k, num, scale)
        idx = sb.select_blocks(probs, num, seqlens, bs, budget, None, True)
        fused = gsel.gate_select(q, k, num, seqlens, bs, budget, None, True, scale)
        row["scores_relerr"] = C.clean_float(C.relerr(reference.gate_scores(q, k, num, scale), probs))
        ref_idx = reference.select_blocks(probs, num, seqlens, bs, budget, None, True)
        row["select_equal"] = bool(torch.equal(idx, ref_idx))
        row["fused_equal"] = bool(torch.equal(fused, idx))
        calls = {
            "scores": lambda: gs.gate_scores(q, k, num, scale),
            "logits": lambda: gs.gate_logits(q, k, num, scale),
            "topk": lambda: sb.select_blocks(probs, num, seqlens, bs, budget, None, True),
            "scores_topk": lambda: sb.select_blocks(gs.gate_scores(q, k, num, scale), num, seqlens, bs, budget,
                                                    None, True),
            "fused": lambda: gsel.gate_select(q, k, num, seqlens, bs, budget, None, True, scale),
        }
        for name, fn in calls.items():
            C.measure(row, name, fn, device, not args.no_graph)
        best = C.best_ms(row, "scores")
        row["scores_floor_frac"] = C.clean_float(row["floor_ms"] / best) if best else None
        rows.append(row)
        t = {n: C.best_ms(row, n) for n in calls}
        text = " ".join(f"{n} {v * 1e3:.1f}us" if v is not None else f"{n} ERR" for n, v in t.items())
        ok = "" if row["select_equal"] and row["fused_equal"] else " SELECT MISMATCH"
        print(f"B={batch} S={tokens} ppu={ppu} chunks={chunks} | {text} | floor {row['floor_ms'] * 1e3:.1f}us "
              f"({row['scores_floor_frac'] or 0:.0%}) relerr {row['scores_relerr'] or math.inf:.1e}{ok}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    ppus = C.parse_list(args.programs_per_unit, int)
    results = []
    for tokens in C.parse_list(args.tokens, C.parse_int):
        for batch in C.parse_list(args.batch, C.parse_int):
            results += point(args, batch, tokens, device, dtype, ppus)
            C.free_memory(device)
    if args.out is not None:
        # A sweep, not a grid to resume: each run writes its own file.
        info = C.env_info(device)
        info["timer"] = C.timer_name(device)
        C.write_results(args.out, "gate_kernels", info, results, merge=False)
    return results


if __name__ == "__main__":
    main()
