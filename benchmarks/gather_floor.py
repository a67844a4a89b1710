"""How fast can the GPU read exactly the bytes that a ``sparse_decode`` call must read?

The floor in ``bench_decode.py`` divides those bytes by the bandwidth of one large
contiguous copy. A sparse decode reads something else: per (row, KV head) a scattered set
of blocks, each ``block_size`` token rows of ``D`` elements at a stride of the whole token
(``Hkv * D``), so a 64-token fp16 block of D 128 is 64 separate 256-byte pieces. This
script times a read-only gather of exactly those pieces (a Triton kernel: one program per
(row, KV head, selected block) loads the block's K and V tiles and stores one sum, so the
loads cannot be dropped), on the same inputs as ``bench_decode.py`` and with the same
timer (CUDA-graph replay, L2 flushed before every run). Its time is what this access
pattern costs the memory system with no attention math at all: the floor a decode kernel
can approach in practice.

    python benchmarks/gather_floor.py --batch 16 --tokens 32k,128k --sparsity 0.5,0.9 \
        --out benchmarks/results/gather-floor-h100.json

Rows: ``gather_graph_ms`` with ``gather_floor_frac`` (copy floor / gather time), beside
``sparse_decode`` of the backends named by ``--backends`` timed in the same process
(``<backend>_graph_ms``, ``<backend>_vs_gather``). With ``--graph-calls N`` each is also
timed as one node of a graph of ``N`` flushed calls (``*_ingraph_ms``,
``gather_ingraph_floor_frac``, ``<backend>_vs_gather_ingraph``; see
``_common.time_in_graph``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


@triton.jit
def _gather_sum_kernel(k_ptr, v_ptr, idx_ptr, out_ptr, keep,
                       stride_kb, stride_ks, stride_kh, stride_ib, stride_ih,
                       BLOCK: tl.constexpr, D: tl.constexpr):
    b = tl.program_id(2)
    h = tl.program_id(1)
    slot = tl.program_id(0)
    blk = tl.load(idx_ptr + b * stride_ib + h * stride_ih + slot)
    rows = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    offs = b.to(tl.int64) * stride_kb + h * stride_kh + rows[:, None] * stride_ks + tl.arange(0, D)[None, :]
    total = tl.sum(tl.load(k_ptr + offs).to(tl.float32)) + tl.sum(tl.load(v_ptr + offs).to(tl.float32))
    tl.store(out_ptr + (b * tl.num_programs(1) + h) * keep + slot, total)


def gather_sum(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """Read the K and V blocks ``idx`` [B, Hkv, keep] names (caches [B, S, Hkv, D], the same
    strides) and return one float per block (their sum)."""
    batch, hkv, keep = idx.shape
    out = torch.empty(batch, hkv, keep, dtype=torch.float32, device=k.device)
    _gather_sum_kernel[(keep, hkv, batch)](
        k, v, idx, out, keep, k.stride(0), k.stride(1), k.stride(2), idx.stride(0), idx.stride(1),
        BLOCK=block_size, D=k.shape[3], num_warps=4)
    return out


def reference_sums(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """:func:`gather_sum` in PyTorch (fp32), to check that the kernel reads the right bytes."""
    batch, smax, hkv, dim = k.shape
    pick = idx.long()[..., None, None].expand(-1, -1, -1, block_size, dim)

    def blocks(x):
        return x.float().view(batch, smax // block_size, block_size, hkv, dim).permute(0, 3, 1, 2, 4)

    return blocks(k).gather(2, pick).sum((-1, -2)) + blocks(v).gather(2, pick).sum((-1, -2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    p.add_argument("--batch", default="16")
    p.add_argument("--tokens", default="32k,128k")
    p.add_argument("--sparsity", default="0.5,0.9")
    p.add_argument("--hq", type=int, default=64)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--backends", default="triton,tilelang", help="sparse_decode backends timed beside the gather")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--graph-calls", type=int, default=0, metavar="N",
                   help="also time each call as one node of a graph of N flushed calls; 0 (default) skips it")
    C.add_l2_flush_arg(p)
    args = p.parse_args(argv)
    if args.graph_calls < 0:
        p.error(f"--graph-calls must be >= 0, got {args.graph_calls}")
    C.set_l2_flush(args.l2_flush)
    C.set_graph_calls(args.graph_calls)
    device = torch.device("cuda")
    from seerattn_r import backend, ops

    dtype = C.DTYPES[args.dtype]
    info = C.env_info(device)
    info.update(bench="gather_floor", key_fields=["batch", "tokens", "sparsity", "dtype"], timer=C.timer_name(device))
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for batch in C.parse_list(args.batch, C.parse_int):
        for tokens in C.parse_list(args.tokens, C.parse_int):
            for sparsity in C.parse_list(args.sparsity, float):
                nblk = tokens // args.block_size
                keep = max(1, round(nblk * (1 - sparsity)))
                q = torch.randn(batch, args.hq, args.head_dim, dtype=dtype, device=device, generator=gen)
                k = torch.randn(batch, tokens, args.hkv, args.head_dim, dtype=dtype, device=device, generator=gen)
                v = torch.randn(batch, tokens, args.hkv, args.head_dim, dtype=dtype, device=device, generator=gen)
                lens = torch.full((batch,), tokens, dtype=torch.int32, device=device)
                idx = C.random_block_indices(batch, args.hkv, nblk, keep, gen, device)
                nbytes = batch * args.hkv * keep * args.block_size * 2 * args.head_dim * k.element_size()
                row = dict(batch=batch, tokens=tokens, sparsity=sparsity, dtype=args.dtype, blocks_read=keep,
                           timer=C.timer_name(device), floor_sparse_ms=C.floor_ms(nbytes, device))
                want = reference_sums(k, v, idx, args.block_size)
                row["gather_ok"] = bool(torch.allclose(gather_sum(k, v, idx, args.block_size), want, rtol=1e-3, atol=1e-2))
                del want
                gather = lambda: gather_sum(k, v, idx, args.block_size)  # noqa: E731
                row["gather_graph_ms"] = C.time_graph(gather, device)
                row["gather_floor_frac"] = row["floor_sparse_ms"] / row["gather_graph_ms"]
                if args.graph_calls:
                    row["gather_ingraph_ms"] = C.time_in_graph(gather, device, args.graph_calls)
                    row["gather_ingraph_floor_frac"] = row["floor_sparse_ms"] / row["gather_ingraph_ms"]
                for name in C.parse_list(args.backends, str):
                    with backend.use_backend(name):
                        fn = lambda: ops.sparse_decode(q, k, v, lens, idx, args.block_size)  # noqa: E731
                        row[f"{name}_graph_ms"] = C.time_graph(fn, device)
                        if args.graph_calls:
                            row[f"{name}_ingraph_ms"] = C.time_in_graph(fn, device, args.graph_calls)
                    row[f"{name}_vs_gather"] = row[f"{name}_graph_ms"] / row["gather_graph_ms"]
                    if args.graph_calls:
                        row[f"{name}_vs_gather_ingraph"] = row[f"{name}_ingraph_ms"] / row["gather_ingraph_ms"]
                rows.append(row)
                print({key: (round(val * 1e3, 2) if key.endswith("_ms") else val) for key, val in row.items()
                       if key not in ("timer",)}, flush=True)
                del q, k, v
                C.free_memory(device)
    C.write_results(args.out, "gather_floor", info, rows)


if __name__ == "__main__":
    main()
