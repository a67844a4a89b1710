"""Block-sparse decode kernels against the dense and sparse peers a user would pick, with
the bandwidth floor beside every time.

Grid (default): batch {1, 2, 4, 8, 16} x tokens {8k .. 128k} x sparsity {0.5 .. 0.9},
Hq=64, Hkv=8, D=128, block 64, fp16. Every row has ``cache_seqlens`` full and random
top-k block indices: per (row, KV head) a uniformly random subset of
``round((1 - sparsity) * Nblk)`` blocks, ascending (the order ``select_blocks`` emits);
sparsity is the fraction of blocks *not* read.

Per point:

* ``seerattn_<backend>`` for every available backend (``seerattn_r.backend.use_backend``
  + ``seerattn_r.ops.sparse_decode``), checked against ``seerattn_r.reference`` first
  (``*_relerr``, ``*_lse_relerr``, ``*_ok``; on the first ``ref_rows`` rows when the
  reference's fp32 copies would not fit in memory at the full batch);
* ``sdpa_flash``: ``F.scaled_dot_product_attention`` under the flash backend, dense,
  q as ``[B, Hq, 1, D]``, GQA native (``enable_gqa``; else K/V repeated outside the
  timed region, ``sdpa_gqa`` says which);
* ``flex_dense`` / ``flex_sparse``: FlexAttention compiled (eager on CPU), dense and with
  a ``BlockMask`` of the same indices (see :func:`flex_block_mask`; its output is
  checked against the reference too, ``flex_sparse_relerr``);
* ``flashinfer``: FlashInfer's paged batch decode, dense, when ``flashinfer`` imports;
* floors: ``floor_sparse_ms`` (bytes of the selected K and V blocks / measured copy
  bandwidth) and ``floor_dense_ms`` (the whole K and V);
* every timing eager (``<name>_ms``) and replayed from a CUDA graph
  (``<name>_graph_ms``); ``<name>_floor_frac`` = floor / best of the two;
  with ``--graph-calls N`` also as one node of a graph of ``N`` flushed calls
  (``<name>_ingraph_ms``, without the fixed launch cost a one-call replay pays; see
  ``_common.time_in_graph``) and ``<seerattn>_ingraph_floor_frac``;
  ``best_dense_ms``/``best_dense`` and ``<seerattn>_speedup`` over it;
  ``<seerattn>_vs_flex_sparse``.

A failure (OOM, compile error, unsupported shape) is stored as ``<name>_err`` in the row
and the grid goes on. Dense peers do not depend on the sparsity: they are timed once per
(batch, tokens) and copied into each of its rows.

Splitting the grid (a GPU call is limited in time): ``--batch``/``--tokens``/``--sparsity``
pick a chunk; ``--max-seconds`` stops before a point that would overrun; points already
in the ``--out`` file are skipped (``--redo`` to measure again) and new rows are merged
into it, so rerunning the same command resumes. ``benchmarks/merge.py`` joins files.

    python benchmarks/bench_decode.py --quick --out $OUT/decode.json
    python benchmarks/bench_decode.py --tokens 32k --max-seconds 450 --out $OUT/decode.json
"""

from __future__ import annotations

import argparse
import inspect
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from seerattn_r import backend as sbackend  # noqa: E402
from seerattn_r import ops  # noqa: E402
from seerattn_r import reference  # noqa: E402

KEY_FIELDS = ["batch", "tokens", "sparsity", "dtype", "block_size", "hq", "hkv", "head_dim"]
PEERS = ("sdpa", "flex", "flashinfer")
DENSE_NAMES = ("sdpa_flash", "flex_dense", "flashinfer")
# Rough cost of the grid, for the estimate printed before it starts: allocating a cache,
# timing the dense peers and (first time per shape) compiling FlexAttention, per
# (batch, tokens); then the sparse kernels and their check, per point.
EST_SHAPE_S = 25.0
EST_POINT_S = 4.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_grid_args(p)
    p.add_argument("--peers", default=",".join(PEERS), help=f"subset of {','.join(PEERS)}, or 'none'")
    args = C.finish_grid_args(p, p.parse_args(argv))
    args.peers = [] if args.peers == "none" else C.parse_list(args.peers, str)
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        p.error(f"--peers: unknown {sorted(unknown)}; choose from {','.join(PEERS)}")
    return args


def reference_rows(args, tokens: int, device: torch.device, batch: int) -> int:
    """How many rows the reference can check at once: it makes fp32 copies of K and V
    (gathered) and of K and V repeated to every query head, plus fp32 scores."""
    per_token = 4 * (4 * args.hkv * args.head_dim + 2 * args.hq * args.head_dim + 4 * args.hq)
    per_row = tokens * per_token
    if C.on_gpu(device):
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 2, 24 << 30)
    else:
        budget = 2 << 30
    return max(1, min(batch, budget // per_row))


_FLEX_COMPILED = None


def flex_fn(device: torch.device):
    """FlexAttention as a user runs it: compiled on a GPU; eager on CPU, where compiling it
    would take most of a smoke test (``flex_mode`` in the row says which)."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if not C.on_gpu(device):
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention, "eager (CPU)"
    if _FLEX_COMPILED is None:
        import torch._dynamo.config as dynamo_config

        # One compile per (batch, tokens) shape: the default limit of 8 would send later
        # shapes to the (slow, memory-hungry) eager path.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, 256)
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED, "compiled"


def flex_block_mask(idx: torch.Tensor, hq: int, nblk: int, tokens: int, block_size: int):
    """A ``BlockMask`` that reads exactly the blocks of ``idx [B, Hkv, keep]`` for each
    query head of the group.

    The blocks are given as *full* blocks (``BlockMask.from_kv_blocks``, no ``[B, H, Q,
    KV]`` dense mask built, so it fits at 16 x 128k), so the compiled kernel never
    evaluates the mask_mod; the mask_mod (a lookup in the same block table) is what makes
    the eager path, which ignores the block structure, compute the same thing."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, hkv, keep = idx.shape
    per_q = idx.repeat_interleave(hq // hkv, dim=1)
    full_idx = torch.zeros(batch, hq, 1, nblk, dtype=torch.int32, device=idx.device)
    full_idx[:, :, 0, :keep] = per_q
    full_num = torch.full((batch, hq, 1), keep, dtype=torch.int32, device=idx.device)
    table = torch.zeros(batch, hq, nblk, dtype=torch.bool, device=idx.device)
    table.scatter_(2, per_q.long(), True)

    def selected(b, h, q_idx, kv_idx):
        return table[b, h, kv_idx // block_size]

    kwargs = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # only the backward pass needs them
    return BlockMask.from_kv_blocks(
        torch.zeros_like(full_num), torch.zeros_like(full_idx), full_num, full_idx,
        BLOCK_SIZE=(128, block_size), mask_mod=selected, seq_lengths=(1, tokens), **kwargs,
    )


def dense_peers(args, q, k_cache, v_cache, device, graph: bool) -> dict:
    """Time the dense baselines once for this (batch, tokens): they read every block."""
    row: dict = {}
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
    k4, v4 = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # [B, Hkv, S, D] views
    if "sdpa" in args.peers:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa_gqa():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q4, k4, v4, enable_gqa=True)

        try:
            sdpa_gqa()
            row["sdpa_gqa"] = "enable_gqa"
            C.measure(row, "sdpa_flash", sdpa_gqa, device, graph)
        except Exception as exc:  # noqa: BLE001 - no GQA in this flash build: repeat K/V
            row["sdpa_gqa"] = f"repeated K/V ({C.short_error(exc, 120)})"
            try:
                g = args.hq // args.hkv
                kr, vr = k4.repeat_interleave(g, dim=1), v4.repeat_interleave(g, dim=1)

                def sdpa_rep():
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        return F.scaled_dot_product_attention(q4, kr, vr)

                C.measure(row, "sdpa_flash", sdpa_rep, device, graph)
                del kr, vr
            except Exception as exc2:  # noqa: BLE001
                row["sdpa_flash_err"] = C.short_error(exc2)
        C.free_memory(device)
    if "flex" in args.peers:
        flex, row["flex_mode"] = flex_fn(device)
        C.measure(row, "flex_dense", lambda: flex(q4, k4, v4, enable_gqa=True), device, graph)
        C.free_memory(device)
    if "flashinfer" in args.peers:
        flashinfer_dense(row, args, q, k_cache, v_cache, device, graph)
    return row


def flashinfer_dense(row, args, q, k_cache, v_cache, device, graph: bool) -> None:
    """FlashInfer's paged batch decode over the whole cache (pages = our blocks, NHD),
    when flashinfer imports; absent, the row says nothing about it."""
    try:
        import flashinfer
    except ImportError:
        return
    try:
        batch, tokens, hkv, d = k_cache.shape
        bs = args.block_size
        pages = tokens // bs
        k_pages = k_cache.reshape(batch * pages, bs, hkv, d)
        v_pages = v_cache.reshape(batch * pages, bs, hkv, v_cache.shape[-1])
        indptr = torch.arange(batch + 1, dtype=torch.int32, device=device) * pages
        indices = torch.arange(batch * pages, dtype=torch.int32, device=device)
        last = torch.full((batch,), bs, dtype=torch.int32, device=device)
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="NHD")
        plan = getattr(wrapper, "plan", None) or wrapper.begin_forward
        plan(indptr, indices, last, args.hq, hkv, d, bs, data_type=q.dtype)
        run = getattr(wrapper, "run", None) or wrapper.forward
        C.measure(row, "flashinfer", lambda: run(q, (k_pages, v_pages)), device, graph)
    except Exception as exc:  # noqa: BLE001
        row["flashinfer_err"] = C.short_error(exc)
    C.free_memory(device)


def sparse_point(args, row, q, k_cache, v_cache, seqlens, idx, backends, device, graph) -> None:
    """Check and time every seerattn backend and FlexAttention's block-sparse path on one
    set of block indices, into ``row``."""
    batch, tokens = k_cache.shape[:2]
    bs = args.block_size
    dtype = q.dtype
    rows = reference_rows(args, tokens, device, batch)
    row["ref_rows"] = rows
    ref_out = ref_lse = None
    try:
        ref_out, ref_lse = reference.sparse_decode(
            q[:rows], k_cache[:rows], v_cache[:rows], seqlens[:rows], idx[:rows], bs,
            1.0 / math.sqrt(args.head_dim), None,
        )
    except Exception as exc:  # noqa: BLE001
        row["ref_err"] = C.short_error(exc)
    C.free_memory(device)

    for name, why_not in backends.items():
        key = f"seerattn_{name}"
        if why_not is not None:
            row[f"{key}_err"] = why_not
            continue
        try:
            with sbackend.use_backend(name):
                out, lse = ops.sparse_decode(q, k_cache, v_cache, seqlens, idx, bs, return_lse=True)
        except Exception as exc:  # noqa: BLE001
            row[f"{key}_err"] = C.short_error(exc)
            C.free_memory(device)
            continue
        if ref_out is not None:
            row[f"{key}_relerr"] = C.clean_float(C.relerr(ref_out, out[:rows]))
            row[f"{key}_lse_relerr"] = C.clean_float(C.relerr(ref_lse, lse[:rows]))
            row[f"{key}_ok"] = bool(
                row[f"{key}_relerr"] is not None and row[f"{key}_relerr"] <= C.RTOL[dtype]
                and row[f"{key}_lse_relerr"] is not None and row[f"{key}_lse_relerr"] <= C.RTOL[dtype]
            )
        del out, lse

        def call(name=name):
            with sbackend.use_backend(name):
                return ops.sparse_decode(q, k_cache, v_cache, seqlens, idx, bs)

        C.measure(row, key, call, device, graph)
        C.free_memory(device)

    if "flex" in args.peers:
        flex, row["flex_mode"] = flex_fn(device)
        try:
            mask = flex_block_mask(idx, args.hq, k_cache.shape[1] // bs, tokens, bs)
            q4, k4, v4 = q.unsqueeze(2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)

            def flex_sparse():
                return flex(q4, k4, v4, block_mask=mask, enable_gqa=True)

            out = flex_sparse()[:, :, 0]
            if ref_out is not None:
                row["flex_sparse_relerr"] = C.clean_float(C.relerr(ref_out, out[:rows]))
                row["flex_sparse_ok"] = bool(
                    row["flex_sparse_relerr"] is not None and row["flex_sparse_relerr"] <= C.RTOL[dtype]
                )
            del out
            C.measure(row, "flex_sparse", flex_sparse, device, graph)
            del mask
        except Exception as exc:  # noqa: BLE001
            row["flex_sparse_err"] = C.short_error(exc)
        C.free_memory(device)


def summarise(row: dict, backends: dict) -> str:
    """Fill the derived columns (floor fractions, speedups) and return the progress text."""
    for name in DENSE_NAMES:
        b = C.best_ms(row, name)
        if b is not None:
            row[f"{name}_floor_frac"] = row["floor_dense_ms"] / b
    dense = {n: C.best_ms(row, n) for n in DENSE_NAMES}
    dense = {n: t for n, t in dense.items() if t is not None}
    if dense:
        row["best_dense"] = min(dense, key=dense.get)
        row["best_dense_ms"] = dense[row["best_dense"]]
    flex_sparse = C.best_ms(row, "flex_sparse")
    if flex_sparse is not None:
        row["flex_sparse_floor_frac"] = row["floor_sparse_ms"] / flex_sparse
    parts = [f"floor {row['floor_sparse_ms'] * 1e3:.1f}us"]
    for name in backends:
        key = f"seerattn_{name}"
        b = C.best_ms(row, key)
        if b is None:
            parts.append(f"{name} ERR")
            continue
        row[f"{key}_floor_frac"] = row["floor_sparse_ms"] / b
        if "best_dense_ms" in row:
            row[f"{key}_speedup"] = row["best_dense_ms"] / b
        if flex_sparse is not None:
            row[f"{key}_vs_flex_sparse"] = flex_sparse / b
        ok = {True: "", False: " WRONG"}.get(row.get(f"{key}_ok"), " unchecked")
        in_graph = ""
        if row.get(f"{key}_ingraph_ms") is not None:
            row[f"{key}_ingraph_floor_frac"] = row["floor_sparse_ms"] / row[f"{key}_ingraph_ms"]
            in_graph = f" (in graph {row[f'{key}_ingraph_ms'] * 1e3:.1f}us {row[f'{key}_ingraph_floor_frac']:.0%}fl)"
        parts.append(
            f"{name} {b * 1e3:.1f}us {row[f'{key}_floor_frac']:.0%}fl"
            + (f" x{row[f'{key}_speedup']:.2f}" if f"{key}_speedup" in row else "") + in_graph + ok
        )
    if "best_dense_ms" in row:
        parts.append(f"dense {row['best_dense']} {row['best_dense_ms'] * 1e3:.1f}us")
    if flex_sparse is not None:
        parts.append(f"flex_sparse {flex_sparse * 1e3:.1f}us")
    errs = [k[:-4] for k in row if k.endswith("_err") and k != "ref_err" and isinstance(row[k], str)]
    if errs:
        parts.append("err: " + ",".join(errs))
    return " | ".join(parts)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device, dtype, graph, backends, info, out = C.start_run(args, "decode", KEY_FIELDS, peers=args.peers)
    skip = set() if args.redo else C.done_keys(args.out, KEY_FIELDS)
    print(f"# {info.get('gpu') or info.get('cpu')} copy {info['copy_GBps']:.0f} GB/s | "
          f"backends {backends} | peers {args.peers} | timer: {info['timer']}", flush=True)

    base = dict(dtype=args.dtype, block_size=args.block_size, hq=args.hq, hkv=args.hkv,
                head_dim=args.head_dim)
    shapes = [(b, t) for t in args.tokens for b in args.batch]
    todo = [
        (b, t, s) for b, t in shapes for s in args.sparsity
        if (b, t, s, *base.values()) not in skip
    ]
    n_shapes = len({(b, t) for b, t, _ in todo})
    print(f"# {len(todo)} points ({len(skip)} already in {args.out}) over {n_shapes} (batch, tokens) "
          f"shapes; rough estimate {n_shapes * EST_SHAPE_S + len(todo) * EST_POINT_S:.0f}s "
          f"on a GPU (FlexAttention compiles dominate)", flush=True)
    progress = C.Progress(len(todo), args.max_seconds)
    gen = torch.Generator(device=device)
    results: list[dict] = []
    elt = torch.finfo(dtype).bits // 8
    stopped = []
    for batch, tokens in shapes:
        points = [s for b, t, s in todo if (b, t) == (batch, tokens)]
        if not points:
            continue
        if progress.should_stop():
            stopped.extend((batch, tokens, s) for s in points)
            continue
        gen.manual_seed(args.seed)
        nblk = math.ceil(tokens / args.block_size)
        try:
            q = torch.randn(batch, args.hq, args.head_dim, dtype=dtype, device=device, generator=gen)
            k_cache = torch.randn(batch, tokens, args.hkv, args.head_dim, dtype=dtype, device=device, generator=gen)
            v_cache = torch.randn(batch, tokens, args.hkv, args.head_dim, dtype=dtype, device=device, generator=gen)
        except Exception as exc:  # noqa: BLE001 - the cache itself does not fit
            for s in points:
                row = dict(base, batch=batch, tokens=tokens, sparsity=s, timer=info["timer"],
                           alloc_err=C.short_error(exc))
                results.append(row)
                progress.line(f"B={batch} S={tokens} sp={s}: cache allocation failed")
            C.free_memory(device)
            continue
        seqlens = torch.full((batch,), tokens, dtype=torch.int32, device=device)
        dense_bytes = batch * tokens * args.hkv * 2 * args.head_dim * elt
        dense = dense_peers(args, q, k_cache, v_cache, device, graph)
        for s in points:
            if progress.should_stop():
                stopped.append((batch, tokens, s))
                continue
            keep = max(1, round((1.0 - s) * nblk))
            idx = C.random_block_indices(batch, args.hkv, nblk, keep, gen, device)
            row = dict(base, batch=batch, tokens=tokens, sparsity=s, timer=info["timer"],
                       blocks=nblk, blocks_read=keep, true_sparsity=1.0 - keep / nblk)
            row["floor_sparse_ms"] = C.floor_ms(batch * args.hkv * keep * args.block_size * 2 * args.head_dim * elt, device)
            row["floor_dense_ms"] = C.floor_ms(dense_bytes, device)
            row.update(dense)
            sparse_point(args, row, q, k_cache, v_cache, seqlens, idx, backends, device, graph)
            text = summarise(row, backends)
            results.append(row)
            progress.line(f"B={batch} S={tokens} sp={s} | {text}")
            C.write_results(out, "decode", info, results)
            del idx
        del q, k_cache, v_cache, seqlens
        C.free_memory(device)
    C.finish_run(out, "decode", info, results, len(stopped))
    return results


if __name__ == "__main__":
    main()
