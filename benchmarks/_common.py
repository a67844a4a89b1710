"""Shared machinery of the benchmark scripts: timing, the bandwidth floor, environment
info, result files.

Timing (:func:`time_eager`, :func:`time_graph`):

* GPU (CUDA or ROCm): the median of per-run device-event times, in a loop equivalent to
  ``triton.testing.do_bench``: a few flushed calls estimate the per-call time, untimed
  calls fill the warm-up budget ``WARMUP_MS``, then timed runs fill ``rep_ms``, each run
  preceded by an L2 flush and timed from an event recorded after the flush to one after
  the call. The flush passes a 256 MiB buffer (allocated once per device) through L2, so
  every timed run starts with none of its inputs in L2. Two kinds, chosen module-wide by
  :func:`set_l2_flush` (``--l2-flush`` of every script that times on a GPU):

  - ``clean`` (default): the buffer is *read* (summed into a preallocated scalar); L2 is
    left holding clean lines, which the timed call evicts at no cost.
  - ``dirty``: the buffer is *zeroed*, as ``do_bench`` does; L2 is left full of dirty
    lines, and the timed call pays their write-back as it evicts them: the flush's own
    cost, charged to the kernel. Kept so that times compare with figures measured by
    ``do_bench``: the peers' anchors in ``benchmarks/anchors`` and the result files
    measured before the flush was selectable.

  Clean is the default because it measures the kernel from a cold L2 without that
  write-back. On an H100, CUDA-graph replay of ``sparse_decode`` (fp16, batch 16 x 32k,
  90% sparse, Hq 64, Hkv 8, D 128, block 64; floor 71.3 us) took 91.8 us (Triton) and
  91.8 us (TileLang) with the dirty flush, 81.8 / 82.7 us with the clean one and
  82.2 / 81.4 us with no flush at all (the data exceeds L2, so no flush leaves nothing
  of use in it): the dirty flush adds about 10 us at batch 16, and 2-6 us at batch 1-4.

  CUDA-graph replay: the call is captured once in a ``torch.cuda.CUDAGraph`` and
  ``graph.replay`` is timed by the same loop, so the replays are flushed too.

  Both loops time one launch between two events, and that carries a fixed cost of its
  own: on an H100 a one-element ``add_`` measures 4.2 us eager and 4.5 us as a graph
  replay. A decode step captured as one graph pays it once, not per kernel, so
  :func:`time_in_graph` (``--graph-calls N``) also measures a call as one node among many:
  a graph of ``N`` x (flush, call) against a graph of the ``N`` flushes alone, replayed in
  alternation; the median over pairs of the difference, over ``N``, is the call's time
  plus the one dependent-node gap it adds to a graph.
  ``torch.cuda`` is also PyTorch's ROCm API (HIP graphs, events), so nothing here is
  CUDA-only.
* CPU: a host timer (``time.perf_counter`` median), no flush and no graph; every row
  records which timer (and on a GPU which flush) produced it in ``row["timer"]`` (see
  :func:`timer_name`), and a result file's ``info["l2_flush"]`` the flush of its run.

The floor of a memory-bound call is ``bytes it must read / copy bandwidth``, with the
bandwidth *measured* on the device by :func:`copy_bandwidth` (a large device-to-device
copy; bytes read + bytes written over its time), never looked up.

Result files: ``{"schema", "bench", "info", "rows"}`` JSON (see :func:`write_results`);
:func:`merge_results` joins the files of a grid run in several calls (later rows win on
the same key).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

SCHEMA = "seerattn-r-bench/1"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Relative error ||out - ref|| / ||ref|| allowed per dtype: the same bounds as the op tests
# (tests/utils.py RTOL), so a benchmark row that passes is a kernel the tests would pass.
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# The GPU timing loop's budgets in ms (do_bench's defaults). Short, since a grid point
# times a dozen calls; the median over >= 100 runs of a >= 10 us kernel is stable to
# about 1%.
WARMUP_MS = 25
REP_MS = 100

# The L2 flush before every timed GPU run (see the module docstring): "clean" reads the
# flush buffer, "dirty" zeroes it as do_bench does. Set by set_l2_flush (--l2-flush).
L2_FLUSHES = ("clean", "dirty")
L2_FLUSH = "clean"
# do_bench's flush size: 256 MiB, five times the 50 MB L2 of an H100 or H200.
FLUSH_BYTES = 256 * 2**20
# Calls per graph of time_in_graph; 0 skips it. Set by set_graph_calls (--graph-calls).
GRAPH_CALLS = 0


def on_gpu(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def set_l2_flush(kind: str) -> None:
    """Choose the L2 flush before every timed GPU run, for every later timing in this
    process: ``"clean"`` (read a 256 MiB buffer) or ``"dirty"`` (zero it, as
    ``triton.testing.do_bench``)."""
    global L2_FLUSH
    if kind not in L2_FLUSHES:
        raise ValueError(f"set_l2_flush(kind): kind must be one of {', '.join(L2_FLUSHES)}; got {kind!r}")
    L2_FLUSH = kind


def set_graph_calls(calls: int) -> None:
    """Time every later :func:`measure` also with :func:`time_in_graph` over ``calls``
    calls per graph (0: do not)."""
    global GRAPH_CALLS
    if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
        raise ValueError(f"set_graph_calls(calls): calls must be an int >= 0; got {calls!r}")
    GRAPH_CALLS = calls


def add_l2_flush_arg(p: argparse.ArgumentParser) -> None:
    """``--l2-flush {clean,dirty}``; the script passes it to :func:`set_l2_flush`."""
    p.add_argument(
        "--l2-flush", choices=L2_FLUSHES, default="clean",
        help="L2 flush before every timed GPU run: 'clean' (default) reads a 256 MiB buffer; "
        "'dirty' zeroes it, as triton's do_bench does, and the timed call pays the write-back "
        "of its dirty lines: use it to compare with do_bench figures (benchmarks/anchors, "
        "result files measured before this option)",
    )


def timer_name(device: torch.device) -> str:
    """What :func:`time_eager` measures with on ``device`` (and the L2 flush it uses on a
    GPU); stored in every row."""
    if on_gpu(device):
        if L2_FLUSH == "dirty":
            return ("device-event median, L2 flushed dirty before every run "
                    "(256 MiB zeroed, as do_bench)")
        return "device-event median, L2 flushed clean before every run (256 MiB read)"
    return "host perf_counter median (no GPU: no device events, no L2 flush, no CUDA graph)"


def parse_int(text: str) -> int:
    """``"8k"`` -> 8192, ``"128K"`` -> 131072, ``"300"`` -> 300."""
    text = text.strip().lower()
    if text.endswith("k"):
        return int(float(text[:-1]) * 1024)
    return int(text)


def parse_list(text: str, conv: Callable[[str], object]) -> list:
    return [conv(x) for x in text.split(",") if x.strip()]


def _host_median_ms(fn: Callable[[], object], rep_ms: float, min_reps: int = 3, max_reps: int = 200) -> float:
    fn()  # warm-up: the first call may compile or allocate
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (time.perf_counter() < deadline and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# Per device index: (flush buffer, 0-dim sink of the read flush), allocated once and
# reused by every timing (an allocation per run would time the allocator too).
_FLUSH_BUFFERS: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _l2_flusher(device: torch.device) -> Callable[[], object]:
    """The current flush (:data:`L2_FLUSH`) on ``device``, as a call that enqueues it on
    the current stream."""
    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    if index not in _FLUSH_BUFFERS:
        buf = torch.zeros(FLUSH_BYTES // 4, dtype=torch.int32, device=torch.device("cuda", index))
        sink = torch.zeros((), dtype=torch.int64, device=buf.device)
        _FLUSH_BUFFERS[index] = (buf, sink)
    buf, sink = _FLUSH_BUFFERS[index]
    if L2_FLUSH == "dirty":
        return buf.zero_
    # An int32 sum lands in int64, the sink's dtype: no cast and no new tensor per run.
    return functools.partial(torch.sum, buf, dim=0, out=sink)


def _device_median_ms(fn: Callable[[], object], device: torch.device, rep_ms: float) -> float:
    """do_bench's loop with our flush: median of per-run device-event times in ms."""
    with torch.cuda.device(device):
        flush = _l2_flusher(device)
        fn()  # the first call may compile or allocate
        torch.cuda.synchronize()
        # Estimate a run (flush included, as do_bench does) from a few calls, to size the
        # budgets in calls.
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            flush()
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
        n_warmup = max(1, int(WARMUP_MS / estimate_ms))
        n_repeat = max(1, int(rep_ms / estimate_ms))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
        for _ in range(n_warmup):
            fn()
        for s, e in zip(starts, ends):
            flush()
            # Recorded after the flush is enqueued: the event completes when the flush
            # does, so the run's time is the call's alone.
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return float(statistics.median([s.elapsed_time(e) for s, e in zip(starts, ends)]))


def time_eager(fn: Callable[[], object], device: torch.device, rep_ms: float = REP_MS) -> float:
    """Median time of ``fn()`` in ms (see the module docstring for the method; on a GPU
    each timed run follows the :func:`set_l2_flush` flush)."""
    if not on_gpu(device):
        return _host_median_ms(fn, rep_ms)
    return _device_median_ms(fn, device, rep_ms)


def capture_graph(fn: Callable[[], object], device: torch.device) -> torch.cuda.CUDAGraph:
    """Capture ``fn()`` in a CUDA (or HIP) graph, after warm-up runs on a side stream (the
    capture must not be the first call: libraries allocate workspaces then)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return graph


def time_graph(fn: Callable[[], object], device: torch.device, rep_ms: float = REP_MS) -> float | None:
    """Median time in ms of replaying ``fn()`` from a CUDA graph, L2 flushed between
    replays; None on CPU (no graphs there)."""
    if not on_gpu(device):
        return None
    graph = capture_graph(fn, device)
    try:
        return time_eager(graph.replay, device, rep_ms)
    finally:
        del graph
        free_memory(device)


def time_in_graph(fn: Callable[[], object], device: torch.device, calls: int,
                  rep_ms: float = REP_MS) -> float | None:
    """Per-call time in ms of ``fn()`` as a node of a larger CUDA graph, L2 flushed before
    every call; None on CPU.

    One graph captures ``calls`` x (flush, ``fn()``), another the ``calls`` flushes alone.
    Their replays alternate, each between device events, and the result is the median
    over pairs of (first - second) / ``calls``: the call's time plus the gap of one
    dependent node, without the launch and event overhead that :func:`time_graph` charges
    to every replay (see the module docstring)."""
    if not on_gpu(device):
        return None
    if calls < 1:
        raise ValueError(f"time_in_graph(calls): calls must be >= 1; got {calls}")
    flush = _l2_flusher(device)

    def flushed_calls():
        for _ in range(calls):
            flush()
            fn()

    def flushes():
        for _ in range(calls):
            flush()

    with torch.cuda.device(device):
        both = capture_graph(flushed_calls, device)
        alone = capture_graph(flushes, device)
        try:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
            both.replay()
            marks[1].record()
            alone.replay()
            marks[2].record()
            torch.cuda.synchronize()
            pair_ms = max(marks[0].elapsed_time(marks[2]), 1e-3)
            pairs = max(10, int(rep_ms / pair_ms))
            marks = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(pairs)]
            for first, middle, last in marks:
                first.record()
                both.replay()
                middle.record()
                alone.replay()
                last.record()
            torch.cuda.synchronize()
            diffs = [(a.elapsed_time(b) - b.elapsed_time(c)) / calls for a, b, c in marks]
            return float(statistics.median(diffs))
        finally:
            del both, alone
            free_memory(device)


def pick_backends(spec: str, device: torch.device) -> dict[str, str | None]:
    """The seerattn backends to measure: name -> None if it runs on ``device``, else why
    not. ``spec`` is a comma-separated list or ``auto``: every backend that runs on the
    device, except the torch reference on a GPU."""
    from seerattn_r import backend as sbackend

    if spec != "auto":
        names = parse_list(spec, str)
        return {n: sbackend.unavailable_reason(n, device) for n in names}
    names = [b for b in sbackend.BACKENDS if sbackend.unavailable_reason(b, device) is None]
    if on_gpu(device) and len(names) > 1:
        # The reference materialises fp32 copies of the cache per query head: a check,
        # not a contender, on a GPU.
        names.remove("torch")
    return {n: None for n in names}


def measure(row: dict, name: str, fn, device: torch.device, graph: bool) -> None:
    """Time ``fn`` eager and (on a GPU) replayed from a CUDA graph into ``row``, and with
    :data:`GRAPH_CALLS` set as a node among many (``<name>_ingraph_ms``, see
    :func:`time_in_graph`); a failure becomes ``<name>_err`` / ``<name>_graph_err`` /
    ``<name>_ingraph_err``."""
    try:
        row[f"{name}_ms"] = time_eager(fn, device)
    except Exception as exc:  # noqa: BLE001 - any failure of a contender is data
        row[f"{name}_err"] = short_error(exc)
        free_memory(device)
        return
    if graph and on_gpu(device):
        try:
            row[f"{name}_graph_ms"] = time_graph(fn, device)
        except Exception as exc:  # noqa: BLE001
            row[f"{name}_graph_err"] = short_error(exc)
            free_memory(device)
        if GRAPH_CALLS:
            try:
                row[f"{name}_ingraph_ms"] = time_in_graph(fn, device, GRAPH_CALLS)
            except Exception as exc:  # noqa: BLE001
                row[f"{name}_ingraph_err"] = short_error(exc)
                free_memory(device)


def best_ms(row: dict, name: str) -> float | None:
    times = [row.get(f"{name}_ms"), row.get(f"{name}_graph_ms")]
    times = [t for t in times if t is not None]
    return min(times) if times else None


def relerr(ref: torch.Tensor, out: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the entries finite in both (NaN in ``out`` -> inf)."""
    ref, out = ref.double(), out.double()
    if out.isnan().any():
        return math.inf
    both = torch.isfinite(ref) & torch.isfinite(out)
    if not torch.equal(torch.isfinite(ref), torch.isfinite(out)):
        return math.inf
    num = (out[both] - ref[both]).norm().item()
    den = ref[both].norm().item()
    return num / den if den > 0 else num


def free_memory(device: torch.device) -> None:
    gc.collect()
    if on_gpu(device):
        torch.cuda.empty_cache()


def short_error(exc: BaseException, limit: int = 300) -> str:
    """One line for a row's ``*_err`` field: the exception type and the end of its message
    (the end is where torch puts the useful part of OOM and compile errors)."""
    msg = " ".join(str(exc).split())
    if len(msg) > limit:
        msg = "..." + msg[-limit:]
    return f"{type(exc).__name__}: {msg}"


_BANDWIDTH: dict[str, dict] = {}


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Measured copy bandwidth of ``device``: ``dst.copy_(src)`` of ``nbytes`` (default
    1 GiB on a GPU, or a quarter of free memory if smaller; 64 MiB on CPU), timed like
    any kernel; bandwidth = (bytes read + bytes written) / median time. Cached per device
    and L2 flush for the process. Returns ``{"copy_GBps", "copy_bytes", "copy_ms"}``."""
    key = f"{torch.device(device)}/{L2_FLUSH}"
    if key in _BANDWIDTH:
        return _BANDWIDTH[key]
    if nbytes is None:
        if on_gpu(device):
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(1 << 30, free // 4)
        else:
            nbytes = 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_eager(functools.partial(dst.copy_, src), device, rep_ms=200)
    del src, dst
    free_memory(device)
    result = {"copy_GBps": 2 * nbytes / (ms * 1e-3) / 1e9, "copy_bytes": 2 * nbytes, "copy_ms": ms}
    _BANDWIDTH[key] = result
    return result


def floor_ms(nbytes: float, device: torch.device) -> float:
    """Time in ms to move ``nbytes`` at the device's measured copy bandwidth."""
    return nbytes / (copy_bandwidth(device)["copy_GBps"] * 1e9) * 1e3


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # a bundle unpacked onto sys.path (the GPU machines' tilelang) has no metadata
        return getattr(importlib.import_module(dist), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - absent or broken: report it as absent
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _driver() -> str | None:
    if torch.version.hip:
        out = _run(["rocm-smi", "--showdriverversion", "--json"])
        if out:
            try:
                card = next(iter(json.loads(out).values()))
                return "amdgpu " + str(next(iter(card.values())))
            except (ValueError, StopIteration, AttributeError):
                return out.splitlines()[-1]
        return None
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0] if out else None


def _commit() -> str:
    """The git commit benchmarked: ``SEERATTN_COMMIT`` if set (a copy of the tree with no
    .git, as on the GPU machines), else ``git rev-parse HEAD`` (+ ``-dirty``)."""
    if os.environ.get("SEERATTN_COMMIT"):
        return os.environ["SEERATTN_COMMIT"]
    head = _run(["git", "rev-parse", "HEAD"])
    if head is None:
        return "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + ("-dirty" if dirty else "")


def start_run(args, bench: str, key_fields: list[str], **extra_info):
    """What bench_decode and bench_gate set up before their grid: ``(device, dtype, graph,
    backends, info, out)``; ``graph`` says whether CUDA-graph timings run, ``info`` is the
    environment plus the run's settings (``extra_info`` too), ``out`` the result file."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    graph = not args.no_graph and on_gpu(device)
    backends = pick_backends(args.backends, device)
    info = env_info(device)
    info.update(bench=bench, key_fields=key_fields, timer=timer_name(device),
                backends={k: v or "available" for k, v in backends.items()}, **extra_info)
    out = args.out or default_out(bench, info)
    return device, dtype, graph, backends, info, out


def finish_run(out, bench: str, info: dict, results: list[dict], stopped: int) -> None:
    """Write the run's rows (merged into ``out``) and say whether ``--max-seconds`` left
    ``stopped`` points for a rerun of the same command."""
    if results:
        write_results(out, bench, info, results)
    print(f"# wrote {len(results)} rows to {out}", flush=True)
    if stopped:
        print(f"# stopped by --max-seconds before {stopped} points; rerun the same command "
              f"(with the same --out) to continue", flush=True)


def _portable_argv(argv: list[str]) -> list[str]:
    """The command line as recorded in results: the device tool's output folder written as
    ``$OUT`` and the home folder as ``~``, so no machine's paths land in committed JSON."""
    swaps = [(os.environ.get("OUT"), "$OUT"), (os.path.expanduser("~"), "~")]
    out = []
    for arg in argv:
        for path, name in swaps:
            if path and path != "/" and arg.startswith(path):
                arg = name + arg[len(path):]
        out.append(arg)
    return out


def env_info(device: torch.device, bandwidth: bool = True) -> dict:
    """GPU, driver, library versions, commit and date, for a result file's ``info``, and
    the L2 flush of GPU timings (``l2_flush``; None on CPU); with ``bandwidth`` also the
    measured copy bandwidth (a second of work on the device)."""
    device = torch.device(device)
    info: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "tilelang": _version("tilelang"),
        "flashinfer": _version("flashinfer") or _version("flashinfer-python"),
        "transformers": _version("transformers"),
        "device_type": device.type,
        "argv": _portable_argv(sys.argv[1:]),
    }
    if on_gpu(device):
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_arch=getattr(props, "gcnArchName", None) or f"sm_{props.major}{props.minor}",
            sms=props.multi_processor_count,
            gpu_memory_GiB=round(props.total_memory / 2**30, 1),
            driver=_driver(),
            cuda=torch.version.cuda,
            hip=torch.version.hip,
            l2_flush=L2_FLUSH,
            graph_calls=GRAPH_CALLS,
        )
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                    l2_flush=None)
    if bandwidth:
        info.update(copy_bandwidth(device))
    return info


def gpu_slug(info: dict) -> str:
    name = info.get("gpu") or "cpu"
    for junk in ("NVIDIA ", "AMD ", "Instinct "):
        name = name.replace(junk, "")
    return "-".join(name.lower().split())


def default_out(bench: str, info: dict) -> Path:
    stamp = info["date"][:19].replace(":", "").replace("-", "")
    return RESULTS_DIR / f"{bench}-{gpu_slug(info)}-{stamp}.json"


def load_results(path: Path) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} result file (schema={data.get('schema')!r})")
    return data


def _row_key(row: dict, key_fields: Iterable[str]) -> tuple:
    return tuple(row.get(f) for f in key_fields)


def merge_results(parts: list[dict], fill: bool = False) -> dict:
    """Join result files of one benchmark on one GPU kind into one: rows concatenated,
    a later row replacing an earlier one with the same key (``info["key_fields"]``), or
    with ``fill`` only adding the columns the earlier row lacks (a run of other peers on
    the same points); ``info`` is the first part's, with ``info["parts"]`` listing each
    part's date, commit and bandwidth. Mixing benchmarks or GPU models is a ValueError."""
    if not parts:
        raise ValueError("merge_results(parts) needs at least one result")
    first = parts[0]
    for p in parts[1:]:
        if p["bench"] != first["bench"]:
            raise ValueError(f"cannot merge a {p['bench']!r} result into a {first['bench']!r} one")
        if p["info"].get("gpu") != first["info"].get("gpu"):
            raise ValueError(
                f"cannot merge results of {p['info'].get('gpu')!r} into {first['info'].get('gpu')!r}"
            )
    key_fields = first["info"]["key_fields"]
    rows: dict[tuple, dict] = {}
    part_info = []
    for p in parts:
        part_info.extend(p["info"].get("parts") or [_part_summary(p["info"])])
        for row in p["rows"]:
            key = _row_key(row, key_fields)
            rows[key] = {**row, **rows[key]} if fill and key in rows else row
    info = {k: v for k, v in first["info"].items() if k != "parts"}
    seen, unique = set(), []
    for s in part_info:
        tag = json.dumps(s, sort_keys=True)
        if tag not in seen:
            seen.add(tag)
            unique.append(s)
    info["parts"] = unique
    return {"schema": SCHEMA, "bench": first["bench"], "info": info, "rows": list(rows.values())}


def _part_summary(info: dict) -> dict:
    return {k: info.get(k) for k in ("date", "commit", "copy_GBps", "l2_flush", "argv")}


def write_results(path: Path, bench: str, info: dict, rows: list[dict], merge: bool = True) -> Path:
    """Write ``rows`` as a result file at ``path``; if ``path`` already holds a result of the
    same benchmark and GPU and ``merge``, the new rows are merged into it (so a grid split
    over several calls can point every call at one file). Written atomically."""
    path = Path(path)
    data = {"schema": SCHEMA, "bench": bench, "info": info, "rows": rows}
    if merge and path.exists():
        data = merge_results([load_results(path), data])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=_json_default)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def _json_default(obj: object) -> object:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to a result file")


def clean_float(x: float | None) -> float | None:
    """JSON has no inf/nan: store them as None."""
    if x is None or not math.isfinite(x):
        return None
    return float(x)


GRID = {
    "batch": [1, 2, 4, 8, 16],
    "tokens": [8192, 16384, 32768, 65536, 131072],
    "sparsity": [0.5, 0.6, 0.7, 0.8, 0.9],
}
QUICK_GRID = {"batch": [1, 16], "tokens": [32768, 131072], "sparsity": [0.5, 0.9]}


def add_grid_args(p: argparse.ArgumentParser) -> None:
    """The options bench_decode and bench_gate share: the grid, the shape, backends,
    output, time limit and L2 flush."""
    p.add_argument("--batch", type=lambda s: parse_list(s, int), help="e.g. 1,4,16")
    p.add_argument("--tokens", type=lambda s: parse_list(s, parse_int), help="e.g. 8k,32k,128k")
    p.add_argument("--sparsity", type=lambda s: parse_list(s, float), help="e.g. 0.5,0.9")
    p.add_argument("--quick", action="store_true", help=f"the subset {QUICK_GRID}")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--heads", default="64:8", help="HQ:HKV (default 64:8)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument(
        "--backends", default="auto",
        help="seerattn backends, comma-separated, or 'auto': every one that runs on the "
        "device except the torch reference on a GPU",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="result JSON (merged into if it exists)")
    p.add_argument("--redo", action="store_true", help="measure points already in --out again")
    p.add_argument("--max-seconds", type=float, help="start no point that would end past this")
    p.add_argument("--no-graph", action="store_true", help="skip CUDA-graph replay timings")
    p.add_argument(
        "--graph-calls", type=int, default=0, metavar="N",
        help="also time every call as one node of a graph of N flushed calls "
        "(<name>_ingraph_ms: without the per-launch overhead a one-call replay pays); 0 (default) skips it",
    )
    add_l2_flush_arg(p)


def finish_grid_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the grid defaults (full or ``--quick``), check the shape options and apply
    ``--l2-flush`` (:func:`set_l2_flush`)."""
    grid = QUICK_GRID if args.quick else GRID
    for axis in ("batch", "tokens", "sparsity"):
        if getattr(args, axis) is None:
            setattr(args, axis, grid[axis])
    try:
        args.hq, args.hkv = (int(x) for x in args.heads.split(":"))
    except ValueError:
        p.error(f"--heads must be HQ:HKV, e.g. 64:8; got {args.heads!r}")
    if args.hq % args.hkv:
        p.error(f"--heads: HQ={args.hq} must be a multiple of HKV={args.hkv}")
    for s in args.sparsity:
        if not 0.0 <= s < 1.0:
            p.error(f"--sparsity values must be in [0, 1), got {s}")
    if args.graph_calls < 0:
        p.error(f"--graph-calls must be >= 0, got {args.graph_calls}")
    set_l2_flush(args.l2_flush)
    set_graph_calls(args.graph_calls if not args.no_graph else 0)
    return args


def done_keys(path: Path | None, key_fields: list[str]) -> set[tuple]:
    """Keys of the rows already in the result file ``path`` (empty if there is none)."""
    if path is None or not path.exists():
        return set()
    return {_row_key(r, key_fields) for r in load_results(path)["rows"]}


def random_block_indices(batch: int, hkv: int, nblk: int, keep: int, gen: torch.Generator,
                         device: torch.device) -> torch.Tensor:
    """``[batch, hkv, keep]`` int32: per (row, KV head) a uniformly random subset of
    ``keep`` of the ``nblk`` blocks, ascending (the order ``select_blocks`` emits)."""
    noise = torch.rand(batch, hkv, nblk, generator=gen, device=device)
    idx = noise.topk(keep, dim=-1).indices
    return idx.sort(dim=-1).values.to(torch.int32)


class Progress:
    """One flushed line per grid point, with elapsed time and an estimate of what is left
    (the mean time of the points done so far times the points left)."""

    def __init__(self, total: int, max_seconds: float | None = None):
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self.max_seconds = max_seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def should_stop(self) -> bool:
        """True when the next point would likely end past ``max_seconds``."""
        if self.max_seconds is None or self.done == 0:
            return False
        per_point = self.elapsed() / self.done
        return self.elapsed() + 1.5 * per_point > self.max_seconds

    def line(self, text: str) -> None:
        self.done += 1
        el = self.elapsed()
        eta = el / self.done * (self.total - self.done)
        print(f"[{self.done}/{self.total} {el:5.0f}s eta {eta:4.0f}s] {text}", flush=True)
