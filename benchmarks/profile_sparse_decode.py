"""Run one ``sparse_decode`` point a few times per backend, for a kernel profiler to read.

Meant to be run under Nsight Compute (or ``rocprof``), which times each kernel alone and
reads its hardware counters; the script itself only launches. The shape is the benchmark's
(Hq 64, Hkv 8, D 128, block 64, fp16, full ``cache_seqlens``, random ascending indices)::

    ncu --clock-control none -k regex:"sparse_decode|combine" --launch-count 16 \
        --section SpeedOfLight --section WarpStateStats --section LaunchStats \
        python benchmarks/profile_sparse_decode.py --batch 1 --tokens 32k --calls 2

``--torch-profiler`` prints each backend's kernels and their device time per call instead
(no ncu needed): it shows how many kernels one call launches.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from seerattn_r import backend, ops  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=C.parse_int, default=32768)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--backends", default="triton,tilelang")
    p.add_argument("--calls", type=int, default=4, help="calls per backend")
    p.add_argument("--torch-profiler", action="store_true")
    args = p.parse_args()

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    hq, hkv, d, bs = 64, 8, 128, 64
    nblk = math.ceil(args.tokens / bs)
    keep = max(1, round((1 - args.sparsity) * nblk))
    q = torch.randn(args.batch, hq, d, dtype=torch.float16, device=device, generator=gen)
    k = torch.randn(args.batch, args.tokens, hkv, d, dtype=torch.float16, device=device, generator=gen)
    v = torch.randn_like(k)
    lens = torch.full((args.batch,), args.tokens, dtype=torch.int32, device=device)
    idx = C.random_block_indices(args.batch, hkv, nblk, keep, gen, device)
    for name in C.parse_list(args.backends, str):
        why = backend.unavailable_reason(name, device)
        if why is not None:
            print(f"{name}: skipped ({why})", flush=True)
            continue
        with backend.use_backend(name):
            ops.sparse_decode(q, k, v, lens, idx, bs)  # compile outside the profiled calls
            torch.cuda.synchronize()
            if not args.torch_profiler:
                for _ in range(args.calls):
                    ops.sparse_decode(q, k, v, lens, idx, bs)
                torch.cuda.synchronize()
                continue
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.calls):
                    ops.sparse_decode(q, k, v, lens, idx, bs)
                torch.cuda.synchronize()
        for e in prof.key_averages():
            total = getattr(e, "self_device_time_total", 0)
            if total and e.count:
                print(f"{name}: {e.key[:90]} x{e.count / args.calls:g}/call {total / e.count:.1f}us", flush=True)


if __name__ == "__main__":
    main()
