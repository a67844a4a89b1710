"""Staged GPU check of the TileLang sparse_decode kernel, built so that a hang shows where.

Each stage runs in its own process under its own time limit and prints timestamps; a
stage that overruns is killed and recorded as such, and the next stage still runs:

* ``build``: the benchmark configuration compiled alone (timed: tilelang lowering + nvcc),
  then the configurations ``check`` uses (with ``--every-config``: every configuration the
  GPU property tests can draw without the small-batch cluster combine, and the combine
  for the common shapes), in parallel processes, into TileLang's on-disk cache (so the
  tests that follow compile little);
* ``launch``: one call at batch 1 x 8k and 1 x 32k (90% sparse), each followed by
  ``torch.cuda.synchronize()``;
* ``check``: outputs and LSE against :mod:`seerattn_r.reference` over a spread of shapes
  (the benchmark points, ragged lengths, offsets, strided caches, messy indices, every
  head dim and block size, fp16 and bf16, forced split counts and cluster sizes), repeated
  calls (the split counter resets), CUDA-graph replay, and that no call after the first
  compiles except for another batch size's cluster size;
* ``stress``: 300 launches of each of a few large grids (batch 8/16 x 32k, 51-256 blocks
  per KV head), every other one after an L2 flush, each case in a fresh process killed
  after 40 s: a kernel that deadlocks only now and then (a race between its warps) shows
  here as a named hang, where ``check``'s few calls per shape pass. A clean run is
  evidence, not proof: run the benchmark grid too.

Results go to ``<out>/probe.json``. Timings are left to ``bench_decode.py``::

    python benchmarks/tilelang_probe.py --out $OUT
    python benchmarks/tilelang_probe.py --stage check --out $OUT
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

ROOT = Path(__file__).resolve().parent.parent
STAGES = {"build": 100, "launch": 40, "check": 200, "stress": 200}
# (batch, tokens, blocks per KV head) of the stress stage; each runs STRESS_REPS launches.
STRESS_CASES = [(16, 32768, 51), (8, 32768, 51), (16, 32768, 128), (16, 32768, 256)]
STRESS_REPS = 300
STRESS_LIMIT = 40
T0 = time.perf_counter()
# Writes the stage's results so far to probe.json: a stage killed for time keeps them.
SAVE = lambda: None  # noqa: E731 - replaced in main()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {text}", flush=True)


def _arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}a"


def _build_one(cfg: tuple) -> tuple[tuple, float, str | None]:
    from seerattn_r.kernels.tilelang.sparse_decode import _build

    t = time.perf_counter()
    try:
        _build(*cfg)
    except Exception as exc:  # noqa: BLE001 - a failed configuration is a result
        return cfg, time.perf_counter() - t, f"{type(exc).__name__}: {str(exc)[-300:]}"
    return cfg, time.perf_counter() - t, None


def stage_build(result: dict, every: bool) -> None:
    from seerattn_r.kernels.tilelang import sparse_decode as sd

    arch = _arch()
    main = ("float16", 128, 128, 64, 8, 1, arch)
    say(f"compiling the benchmark configuration {main} alone")
    cfg, secs, err = _build_one(main)
    result["main_compile_s"] = secs
    say(f"  done in {secs:.1f}s err={err}")
    if every:  # what the GPU property tests can draw
        dims = [(64, 64), (64, 128), (128, 128), (128, 64), (256, 256), (256, 64), (256, 128)]
        cfgs = [(dt, d, dv, bs, heads, 1, arch) for dt, (d, dv), bs, heads in
                itertools.product(("float16", "bfloat16"), dims, (16, 32, 64, 128), (8, 16))]
        # Groups past 16 (wgmma N 32 and 64), at the tile shapes that differ: swap-AB
        # (64-token tiles) and the small-block form.
        cfgs += [(dt, d, dv, bs, heads, 1, arch) for dt, (d, dv), bs, heads in
                 itertools.product(("float16", "bfloat16"), [(128, 128), (256, 256)], (32, 64), (32, 64))]
        # The small-batch cluster combine, for the common shapes (other configurations
        # compile on first use).
        cfgs += [(dt, d, dv, bs, 8, cluster, arch) for dt, (d, dv), bs, cluster in
                 itertools.product(("float16", "bfloat16"), [(128, 128), (64, 64)], (16, 64), sd._CLUSTERS)]
    else:  # what the check stage uses
        dtypes = {"fp16": "float16", "bf16": "bfloat16"}
        cfgs = sorted({(dtypes[c[1]], c[6], c[7], c[8], sd._heads(c[4] // c[5]), cluster, arch)
                       for c in CASES for cluster in _clusters(c)} - {main})
    say(f"compiling {len(cfgs)} configurations in parallel")
    built = []
    workers = max(1, min(len(cfgs), (os.cpu_count() or 2) - 1))
    with cf.ProcessPoolExecutor(workers) as pool:
        for cfg, secs, err in pool.map(_build_one, cfgs):
            built.append({"cfg": list(cfg[:6]), "s": round(secs, 1), "err": err})
            if err:
                say(f"  {cfg}: {err}")
    result["builds"] = built
    say(f"  {sum(b['err'] is None for b in built)}/{len(built)} built")


def _case(dtype, batch, tokens, hq, hkv, d, dv, bs, keep=None, ragged=False, offsets=False,
          strided=False, messy=False, seed=0):
    """Inputs of one sparse_decode call. ``keep``: blocks per (row, KV head), random ids
    ascending; ``messy``: shuffled with -1, duplicates and ids past the row's blocks."""
    import torch

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(seed)
    smax = tokens
    lens = torch.full((batch,), tokens, dtype=torch.int32, device=dev)
    if ragged:
        lens = torch.randint(0, tokens + 1, (batch,), generator=g, device=dev, dtype=torch.int32)
        lens[0] = tokens - 1 if tokens > 1 else tokens  # a partial last block
    offs = None
    if offsets:
        smax = tokens + 3 * bs + 5
        offs = torch.randint(0, smax - tokens + 1, (batch,), generator=g, device=dev, dtype=torch.int32)
    q = torch.randn(batch, hq, d, generator=g, device=dev).to(dtype)
    if strided:  # transformers' [B, H, S, D] cache seen as [B, S, H, D]
        k = torch.randn(batch, hkv, smax, d, generator=g, device=dev).to(dtype).transpose(1, 2)
        v = torch.randn(batch, hkv, smax, dv, generator=g, device=dev).to(dtype).transpose(1, 2)
    else:
        k = torch.randn(batch, smax, hkv, d, generator=g, device=dev).to(dtype)
        v = torch.randn(batch, smax, hkv, dv, generator=g, device=dev).to(dtype)
    nblk = math.ceil(tokens / bs)
    keep = nblk if keep is None else min(keep, nblk)
    idx = torch.rand(batch, hkv, nblk, generator=g, device=dev).topk(keep, dim=-1).indices
    idx = idx.sort(dim=-1).values.to(torch.int32)
    if messy:
        extra = torch.randint(-1, nblk + 3, (batch, hkv, max(1, keep // 2)), generator=g, device=dev,
                              dtype=torch.int32)
        idx = torch.cat([idx, extra, idx[..., : max(1, keep // 4)]], dim=-1)
        idx = idx[..., torch.randperm(idx.shape[-1], generator=g, device=dev)]
        if batch > 1:
            idx[1, 0] = -1  # a (row, head) with nothing selected
    return q, k, v, lens, idx, offs


CASES = [
    # name, dtype, B, T, Hq, Hkv, D, Dv, bs, keep, ragged, offsets, strided, messy
    ("b1-32k-90", "fp16", 1, 32768, 64, 8, 128, 128, 64, 51, False, False, False, False),
    ("b1-32k-90-bf16", "bf16", 1, 32768, 64, 8, 128, 128, 64, 51, False, False, False, False),
    ("b1-8k-90", "fp16", 1, 8192, 64, 8, 128, 128, 64, 13, False, False, False, False),
    ("b4-32k-50", "bf16", 4, 32768, 64, 8, 128, 128, 64, 256, False, False, False, False),
    ("b2-128k-90", "fp16", 2, 131072, 64, 8, 128, 128, 64, 205, False, False, False, False),
    ("b16-8k-50", "fp16", 16, 8192, 64, 8, 128, 128, 64, 64, False, False, False, False),
    ("b16-32k-90", "fp16", 16, 32768, 64, 8, 128, 128, 64, 51, False, False, False, False),
    ("ragged-off-strided-messy", "fp16", 5, 3000, 32, 4, 128, 128, 64, 20, True, True, True, True),
    ("bs16-d64", "fp16", 3, 1000, 8, 2, 64, 64, 16, 30, True, True, False, True),
    ("bs32-d256-bf16", "bf16", 3, 2500, 16, 1, 256, 256, 32, 40, True, False, True, True),
    ("bs128-d128-dv64", "fp16", 3, 4000, 12, 3, 128, 64, 128, 20, True, True, False, True),
    ("bs128-d64-dv128-bf16", "bf16", 2, 777, 16, 16, 64, 128, 128, 4, True, False, False, True),
    ("g1", "bf16", 2, 5000, 4, 4, 128, 128, 64, 30, True, True, True, True),
    ("long-list", "fp16", 1, 131072, 8, 1, 128, 128, 64, 2048, False, False, False, True),
    ("g16-messy", "bf16", 3, 3000, 32, 2, 128, 128, 64, 25, True, True, False, True),
    ("g64-bs32", "fp16", 2, 2000, 64, 1, 128, 128, 32, 30, True, False, False, True),
    ("g12-bs128-d256", "fp16", 2, 4000, 24, 2, 256, 256, 128, 12, True, True, False, True),
]


def _cluster_of(batch, tokens, hq, hkv, dv, bs, slots) -> int:
    """The cluster size sparse_decode plans for these shapes on this GPU (1: none)."""
    import torch

    from seerattn_r.kernels.tilelang import sparse_decode as sd

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return sd._plan(batch * hkv, slots, tokens, bs, sms, sd._heads(hq // hkv), dv)[1]


def _forced_clusters(hq, hkv, dv, slots) -> list[int]:
    """Every cluster size the exchange allows for these shapes (forced by the check stage)."""
    from seerattn_r.kernels.tilelang import sparse_decode as sd

    fits = sd._heads(hq // hkv) * dv <= sd._CLUSTER_ELEMS
    return [c for c in sd._CLUSTERS if fits and slots <= sd._LIST * c]


def _clusters(case) -> set[int]:
    """Cluster sizes the check stage runs a case with: planned, none, and every forced size."""
    _, _, batch, tokens, hq, hkv, _, dv, bs, keep, *_ = case
    keep = min(keep, -(-tokens // bs))
    slots = keep + (max(1, keep // 2) + max(1, keep // 4) if case[-1] else 0)  # messy: extra, repeated ids
    return {1, _cluster_of(batch, tokens, hq, hkv, dv, bs, slots), *_forced_clusters(hq, hkv, dv, slots)}


def stage_launch(result: dict) -> None:
    import torch

    from seerattn_r import backend, ops

    for name, tokens, keep in (("1x8k", 8192, 13), ("1x32k", 32768, 51)):
        q, k, v, lens, idx, offs = _case(torch.float16, 1, tokens, 64, 8, 128, 128, 64, keep)
        say(f"{name}: first call")
        with backend.use_backend("tilelang"):
            out = ops.sparse_decode(q, k, v, lens, idx, 64)
        say(f"{name}: launched, synchronizing")
        torch.cuda.synchronize()
        say(f"{name}: done, finite={bool(out.isfinite().all())}")
        result[f"launch_{name}"] = bool(out.isfinite().all())
        SAVE()


def _relerr(ref, out) -> float:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _common as C

    return C.relerr(ref, out)


def stage_check(result: dict) -> None:
    import torch

    from seerattn_r import backend, ops, reference
    from seerattn_r.kernels.tilelang import sparse_decode as sd

    sys.path.insert(0, str(ROOT))
    from tests.utils import RTOL

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    real_splits, real_cluster = sd._num_splits, sd._cluster_size
    for case in CASES:
        name, dt, batch, tokens, hq, hkv, d, dv, bs, keep, ragged, offsets, strided, messy = case
        dtype = dtypes[dt]
        q, k, v, lens, idx, offs = _case(dtype, batch, tokens, hq, hkv, d, dv, bs, keep, ragged, offsets,
                                         strided, messy)
        sm = 1.0 / math.sqrt(d)
        ref_out, ref_lse = reference.sparse_decode(q.float(), k.float(), v.float(), lens, idx, bs, sm, offs)
        forced = [f"c{c}" for c in _forced_clusters(hq, hkv, dv, idx.shape[-1])]
        for splits in (None, 1, 3, 64, *forced):
            # None: as planned; n: n splits combined through memory (a forced count still
            # respects the kernel's limit of _LIST index slots per split); "cN": N splits
            # combined in clusters of N.
            if isinstance(splits, str):
                sd._cluster_size = lambda *a, n=int(splits[1:]): n
            elif splits is not None:
                sd._cluster_size = lambda *a: 1
                sd._num_splits = lambda units, slots, max_tiles, sms, n=splits: max(n, math.ceil(slots / sd._LIST))
            try:
                with backend.use_backend("tilelang"):
                    outs = [ops.sparse_decode(q, k, v, lens, idx, bs, sm, offs, return_lse=True) for _ in range(3)]
                torch.cuda.synchronize()
                out, lse = outs[-1]
                row = {"name": name, "splits": splits,
                       "relerr": _relerr(ref_out, out.float()), "lse_relerr": _relerr(ref_lse, lse),
                       "repeat_equal": all(torch.equal(o[0], out) for o in outs),
                       "empty_zero": bool((out[torch.isinf(ref_lse)] == 0).all())}
                row["ok"] = (row["relerr"] <= RTOL[dtype] and row["lse_relerr"] <= 1e-3
                             and row["repeat_equal"] and row["empty_zero"])
            except Exception as exc:  # noqa: BLE001
                row = {"name": name, "splits": splits, "ok": False, "err": f"{type(exc).__name__}: {exc}"[:400]}
            finally:
                sd._num_splits, sd._cluster_size = real_splits, real_cluster
            rows.append(row)
            result["correctness"] = rows
            SAVE()
            say(f"check {name} splits={splits}: {row}")

    # CUDA-graph replay with the cache growing between replays (the decode loop), and no
    # compile after the first call but for other batch sizes' cluster sizes: the
    # compiled-kernel cache grows only by those.
    misses = sd._build.cache_info().misses
    q, k, v, lens, idx, _ = _case(torch.float16, 2, 32768, 64, 8, 128, 128, 64, 100)
    lens.fill_(30000)
    with backend.use_backend("tilelang"):
        ops.sparse_decode(q, k, v, lens, idx, 64)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ops.sparse_decode(q, k, v, lens, idx, 64)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = ops.sparse_decode(q, k, v, lens, idx, 64)
        graph_rows = []
        for step in range(4):
            lens.add_(7)
            graph.replay()
            torch.cuda.synchronize()
            ref, _ = reference.sparse_decode(q.float(), k.float(), v.float(), lens, idx, 64, 1 / math.sqrt(128), None)
            graph_rows.append(_relerr(ref, out.float()))
        clusters = {_cluster_of(2, 32768, 64, 8, 128, 64, 100)}
        for batch, tokens, keep in ((1, 1000, 3), (3, 4096, 50), (2, 20000, 7), (5, 8192, 20), (2, 512, 9)):
            a = _case(torch.float16, batch, tokens, 64, 8, 128, 128, 64, keep)
            ops.sparse_decode(*a[:5], 64)
            clusters.add(_cluster_of(batch, tokens, 64, 8, 128, 64, keep))
    torch.cuda.synchronize()
    result["graph_replay_relerr"] = graph_rows
    result["compiles_after_first"] = sd._build.cache_info().misses - misses
    result["cluster_sizes_after_first"] = len(clusters) - 1
    say(f"graph replay relerr {graph_rows}; compiles after the first call: {result['compiles_after_first']} "
        f"(new cluster sizes among the other batch sizes: {result['cluster_sizes_after_first']})")


def stress_one(index: int) -> None:
    """Child of the stress stage: STRESS_REPS launches of one case, a sync every 20. Every
    other launch follows an L2 flush (a 256 MB memset), as in ``do_bench``: a race showed
    up under the benchmark's interleaving and not under back-to-back launches alone."""
    import torch

    from seerattn_r import backend, ops

    batch, tokens, keep = STRESS_CASES[index]
    q, k, v, lens, idx, _ = _case(torch.float16, batch, tokens, 64, 8, 128, 128, 64, keep)
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    with backend.use_backend("tilelang"):
        for rep in range(STRESS_REPS):
            if rep % 2:
                flush.zero_()
            ops.sparse_decode(q, k, v, lens, idx, 64)
            if rep % 20 == 19:
                torch.cuda.synchronize()
                print(f"rep {rep + 1}", flush=True)


def stage_stress(result: dict) -> None:
    # Compile here first (into TileLang's on-disk cache): the children's limit is for
    # launches, and a child that compiles would be killed for that.
    _, _, err = _build_one(("float16", 128, 128, 64, 8, 1, _arch()))
    if err:  # children would compile, fail and be reported as hangs
        result["build_error"] = err
        say(f"stress: the kernel does not build: {err}")
        return
    rows = []
    for index, case in enumerate(STRESS_CASES):
        cmd = [sys.executable, __file__, "--stress-case", str(index), "--out", "."]
        t = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=STRESS_LIMIT)
            status = "ok" if done.returncode == 0 else f"rc={done.returncode}: {done.stderr.strip()[-300:]}"
            reached = done.stdout
        except subprocess.TimeoutExpired as exc:
            status, reached = f"hang (killed after {STRESS_LIMIT}s)", (exc.stdout or b"").decode()
        lines = reached.strip().splitlines()
        rows.append({"batch": case[0], "tokens": case[1], "blocks": case[2], "status": status,
                     "reached": lines[-1] if lines else "no sync returned",
                     "s": round(time.perf_counter() - t, 1)})
        result["runs"] = rows
        SAVE()
        say(f"stress {case}: {rows[-1]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["all", *STAGES], default="all")
    p.add_argument("--out", type=Path, required=True, help="folder for probe.json")
    p.add_argument("--every-config", action="store_true",
                   help="build every configuration the GPU property tests can draw, not only the checked ones")
    p.add_argument("--stress-case", type=int, help=argparse.SUPPRESS)  # the stress stage's child
    args = p.parse_args()
    if args.stress_case is not None:
        stress_one(args.stress_case)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "probe.json"
    if args.stage == "all":
        # Each stage in a child process under its own limit: a hang is killed and named.
        for stage, limit in STAGES.items():
            say(f"stage {stage} (limit {limit}s)")
            try:
                cmd = [sys.executable, __file__, "--stage", stage, "--out", str(args.out)]
                rc = subprocess.run(cmd + ["--every-config"] * args.every_config, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            say(f"stage {stage}: rc={rc}")
            data = json.loads(path.read_text()) if path.exists() else {}
            data.setdefault("stages", {})[stage] = rc
            path.write_text(json.dumps(data, indent=1))
        return
    global SAVE
    data = json.loads(path.read_text()) if path.exists() else {}
    import torch

    import _common as C  # this script's folder is on sys.path

    data.setdefault("env", C.env_info(torch.device("cuda" if torch.cuda.is_available() else "cpu"), bandwidth=False))
    result = data.setdefault(args.stage, {})
    SAVE = lambda: path.write_text(json.dumps(data, indent=1, default=str))  # noqa: E731
    try:
        if args.stage == "build":
            stage_build(result, args.every_config)
        else:
            {"launch": stage_launch, "check": stage_check, "stress": stage_stress}[args.stage](result)
    finally:
        SAVE()


if __name__ == "__main__":
    main()
