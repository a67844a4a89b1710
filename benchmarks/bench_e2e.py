"""End-to-end decode tokens/s of a Qwen3-4B-shaped model with random weights.

Model (default): hidden 2560, 36 layers, 32/8 heads, head dim 128, intermediate 9728,
vocab 151936, tied embeddings, bf16 (about 4.0B parameters). Grid: context {8k, 32k, 64k}
x batch {1, 4, 16} (points whose weights + KV cache would not fit are recorded as
skipped). Methods (``label`` in a row):

* ``transformers-sdpa``: stock transformers, sdpa attention, ``StaticCache`` (what a user
  gets from ``generate(cache_implementation="static")``);
* ``dense-flashdecode``: the best dense path we have: the same model with an attention
  function that runs ``seerattn_r.ops.sparse_decode`` over every block (flash decoding,
  no gate), on ``transformers``' cache viewed in place;
* ``seerattn-<budget>``: ``seerattn_r.patch_model`` with random gates, token budgets
  {2k, 4k, 8k} (gate + selection + sparse decode in every layer).

Each method runs ``eager``, ``graph`` (the eager step captured once in a CUDA graph and
replayed: seconds to set up) and ``compiled`` (``torch.compile(mode="reduce-overhead",
fullgraph=True)``: Inductor plus CUDA graphs, a minute or two of compile per method and
shape). ``graph`` is skipped on CPU. ``ms_per_step`` is the mean over ``--steps`` greedy
decode steps after warm-up, timed with device events around the whole loop (no host sync
inside it, and no L2 flush: a step reads far more than L2 holds), ``tok_s = batch / step
time``. Beside each: the bandwidth floor of a step (``floor_ms`` = bytes of weights + the
KV blocks read + the gate's compression cache, over the measured copy bandwidth, timed
with ``--l2-flush``'s flush as in every script; ``floor_tok_s``), the fraction of it
reached, and the peak GPU memory.

The KV cache is filled with random data rather than built by a long prefill: a 64-token
prompt is prefilled for real (it initialises the cache and the gate state), then the
``StaticCache`` tensors up to ``context`` tokens (and the gate's compression caches) are
overwritten with N(0, 1) values and decoding starts at position ``context``. A decode
step's cost does not depend on the cached values, and a 64k-token prefill of a 4B model
per point would take much of a 10-minute call.

    python benchmarks/bench_e2e.py --context 32k --batch 4 --out $OUT/e2e.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from seerattn_r import SparseDecodeConfig, ops, patch_model  # noqa: E402
from seerattn_r.integrations import unpatch_model  # noqa: E402
from seerattn_r.integrations.hf import cache_argument  # noqa: E402

KEY_FIELDS = ["model", "context", "batch", "label", "mode", "dtype"]
DENSE_ATTN = "seerattn_bench_dense"
PROMPT = 64
# Rough per-run costs for the estimate printed before a run: a compile with CUDA graphs
# of the 36-layer step; an eager or captured-graph measurement.
EST_S = {"compiled": 90.0, "graph": 15.0, "eager": 15.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=lambda s: C.parse_list(s, C.parse_int), default=[8192, 32768, 65536])
    p.add_argument("--batch", type=lambda s: C.parse_list(s, int), default=[1, 4, 16])
    p.add_argument("--budgets", type=lambda s: C.parse_list(s, C.parse_int), default=[2048, 4096, 8192])
    p.add_argument("--methods", default="transformers-sdpa,dense-flashdecode,seerattn",
                   help="subset of transformers-sdpa,dense-flashdecode,seerattn")
    p.add_argument("--modes", default="eager,graph,compiled", help="subset of eager,graph,compiled")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="decode steps before timing (after compiling)")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--intermediate", type=int, default=9728)
    p.add_argument("--heads", default="32:8", help="HQ:HKV")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(C.DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path)
    p.add_argument("--redo", action="store_true")
    p.add_argument("--max-seconds", type=float)
    C.add_l2_flush_arg(p)  # for the copy bandwidth behind floor_ms; the steps run unflushed
    args = p.parse_args(argv)
    C.set_l2_flush(args.l2_flush)
    args.hq, args.hkv = (int(x) for x in args.heads.split(":"))
    args.methods = C.parse_list(args.methods, str)
    args.modes = C.parse_list(args.modes, str)
    if set(args.modes) - set(EST_S):
        p.error(f"--modes: unknown {sorted(set(args.modes) - set(EST_S))}; choose from {','.join(EST_S)}")
    if args.device == "cpu":
        args.modes = [m for m in args.modes if m != "graph"]  # CUDA graphs need a GPU
    return args


def build_model(args, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hq,
        num_key_value_heads=args.hkv, head_dim=args.head_dim, intermediate_size=args.intermediate,
        vocab_size=args.vocab, tie_word_embeddings=True, rope_theta=1_000_000.0,
        max_position_embeddings=max(args.context) + PROMPT + args.steps + args.warmup + 64,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype).eval()
    model.requires_grad_(False)
    return model


def _register_dense_attention(block_size: int) -> None:
    """``dense-flashdecode``: a one-token step runs ``ops.sparse_decode`` over every block
    of the cache (blocks past a row's length contribute nothing); a prompt runs SDPA."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def dense_decode(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] != 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling, **kwargs)
        batch, hkv, smax = key.shape[:3]
        nblk = math.ceil(smax / block_size)
        # Built per call (a stride-0 view, no copy): a tensor cached across calls would be
        # a CUDA-graph output that the next replay overwrites.
        every = torch.arange(nblk, dtype=torch.int32, device=key.device).expand(batch, hkv, nblk)
        seqlens = (kwargs["position_ids"][:, -1] + 1).to(torch.int32)
        out = ops.sparse_decode(query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2), seqlens,
                                every, block_size, scaling)
        return out[:, None], None

    AttentionInterface.register(DENSE_ATTN, dense_decode)
    AttentionMaskInterface.register(DENSE_ATTN, sdpa_mask)


def fill_random(model, cache, context: int) -> None:
    """Overwrite the first ``context`` cached tokens of every layer (and a patched model's
    gate compression caches) with N(0, 1): what a long prefill would have left, in cost."""
    for layer in cache.layers:
        layer.keys[:, :, :context].normal_()
        layer.values[:, :, :context].normal_()
    rt = getattr(model, "_seerattn", None)
    if rt is not None:
        for gate_cache in rt.layers:
            gate_cache.keys.normal_()


def run_method(args, model, label: str, mode: str, context: int, batch: int, device) -> dict:
    """Prefill a short prompt, fill the cache to ``context`` tokens, time decode steps."""
    from transformers import StaticCache

    row: dict = {}
    steps_total = args.warmup + args.steps
    cache = StaticCache(config=model.config, max_cache_len=context + steps_total + 1)
    cache_arg = cache_argument(model)
    ids = torch.randint(0, args.vocab, (batch, PROMPT), device=device)
    with torch.no_grad():
        model(input_ids=ids, **{cache_arg: cache}, use_cache=True, logits_to_keep=1,
              position_ids=torch.arange(PROMPT, device=device).expand(batch, PROMPT),
              cache_position=torch.arange(PROMPT, device=device))
    fill_random(model, cache, context)

    def step(tok, pos):
        out = model(input_ids=tok, **{cache_arg: cache}, use_cache=True, logits_to_keep=1,
                    position_ids=pos.expand(tok.shape[0], 1), cache_position=pos[0])
        return out.logits[:, -1].argmax(-1, keepdim=True)

    state = {"tok": torch.zeros(batch, 1, dtype=torch.long, device=device),
             "pos": torch.tensor([[context]], dtype=torch.long, device=device)}
    t0 = time.perf_counter()
    if mode == "graph":
        # The step has no host sync by design, so it captures as is; inputs are static
        # buffers updated in place between replays.
        out = {}

        def body():
            out["tok"] = step(state["tok"], state["pos"])

        with torch.no_grad():
            graph = C.capture_graph(body, device)

        def advance():
            graph.replay()
            state["tok"].copy_(out["tok"])
            state["pos"].add_(1)
    else:
        fn = torch.compile(step, mode="reduce-overhead", fullgraph=True) if mode == "compiled" else step

        def advance():
            state["tok"] = fn(state["tok"], state["pos"]).clone()
            state["pos"] = state["pos"] + 1

    with torch.no_grad():
        for _ in range(args.warmup):
            advance()
        if C.on_gpu(device):
            torch.cuda.synchronize(device)
        row["warmup_s"] = time.perf_counter() - t0
        if C.on_gpu(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.steps):
                advance()
            end.record()
            torch.cuda.synchronize(device)
            total = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                advance()
            total = (time.perf_counter() - t0) * 1e3
    row["ms_per_step"] = total / args.steps
    row["tok_s"] = batch * 1e3 / row["ms_per_step"]
    return row


def step_bytes(args, model, context: int, batch: int, budget: int | None) -> float:
    """Bytes a decode step must read: weights, the KV blocks read, the gate's cache."""
    elt = torch.finfo(C.DTYPES[args.dtype]).bits // 8
    weights = sum(p.numel() for p in model.parameters()) * elt
    seqlen = context + 1
    nblk = math.ceil(seqlen / args.block_size)
    if budget is None:
        tokens = seqlen
        gate = 0
    else:
        scored = (seqlen - 1) // args.block_size
        tokens = min(nblk, min(budget // args.block_size, scored) + 2) * args.block_size
        tokens = min(tokens, seqlen)
        gate = args.layers * batch * nblk * args.hkv * 128 * elt
    kv = args.layers * batch * tokens * args.hkv * args.head_dim * 2 * elt
    return weights + kv + gate


def fits(args, model, context: int, batch: int, device) -> str | None:
    """Why this point cannot fit in memory (None if it can)."""
    if not C.on_gpu(device):
        return None
    elt = torch.finfo(C.DTYPES[args.dtype]).bits // 8
    kv = args.layers * batch * (context + 128) * args.hkv * args.head_dim * 2 * elt
    free, _ = torch.cuda.mem_get_info(device)
    need = kv * 1.1 + (2 << 30)  # cache, plus activations, logits and graph pools
    if need > free:
        return f"needs ~{need / 2**30:.0f} GiB for the KV cache and work space, {free / 2**30:.0f} GiB free"
    return None


def methods(args) -> list[tuple[str, int | None]]:
    out = []
    for m in args.methods:
        if m == "seerattn":
            out += [(f"seerattn-{b}", b) for b in args.budgets]
        elif m in ("transformers-sdpa", "dense-flashdecode"):
            out.append((m, None))
        else:
            raise SystemExit(f"--methods: unknown {m!r}")
    return out


def set_method(model, label: str, budget: int | None, block_size: int) -> None:
    if getattr(model, "_seerattn", None) is not None:
        unpatch_model(model)
    if label == "transformers-sdpa":
        model.config._attn_implementation = "sdpa"
    elif label == "dense-flashdecode":
        _register_dense_attention(block_size)
        model.config._attn_implementation = DENSE_ATTN
    else:
        model.config._attn_implementation = "sdpa"
        patch_model(model, SparseDecodeConfig(block_size=block_size, token_budget=budget, collect_stats=False))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = C.DTYPES[args.dtype]
    info = C.env_info(device)
    info.update(bench="e2e", key_fields=KEY_FIELDS)
    out = args.out or C.default_out("e2e", info)
    model = build_model(args, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    model_name = f"qwen3-{params / 1e9:.2f}B-L{args.layers}"
    info.update(params=params, model=model_name)
    skip = set() if args.redo else C.done_keys(args.out, KEY_FIELDS)
    todo = [
        (ctx, b, label, budget, mode)
        for ctx in args.context for b in args.batch for label, budget in methods(args) for mode in args.modes
        if (model_name, ctx, b, label, mode, args.dtype) not in skip
    ]
    est = sum(EST_S[m] for *_, m in todo)
    print(f"# {info.get('gpu') or 'CPU'} copy {info['copy_GBps']:.0f} GB/s | {model_name} | "
          f"{len(todo)} runs, rough estimate {est:.0f}s on a GPU", flush=True)
    progress = C.Progress(len(todo), args.max_seconds)
    results: list[dict] = []
    for ctx, batch, label, budget, mode in todo:
        if progress.should_stop():
            print("# stopped by --max-seconds; rerun with the same --out to continue", flush=True)
            break
        row = dict(model=model_name, context=ctx, batch=batch, label=label, mode=mode,
                   dtype=args.dtype, budget=budget, steps=args.steps)
        floor = C.floor_ms(step_bytes(args, model, ctx, batch, budget), device)
        row.update(floor_ms=floor, floor_tok_s=batch * 1e3 / floor)
        why = fits(args, model, ctx, batch, device)
        if why:
            row["skipped"] = why
        else:
            if C.on_gpu(device):
                torch.cuda.reset_peak_memory_stats(device)
            try:
                set_method(model, label, budget, args.block_size)
                row.update(run_method(args, model, label, mode, ctx, batch, device))
                row["floor_frac"] = floor / row["ms_per_step"]
            except Exception as exc:  # noqa: BLE001 - a failing method is data
                row["err"] = C.short_error(exc)
            if C.on_gpu(device):
                row["peak_mem_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch._dynamo.reset()
            C.free_memory(device)
        results.append(row)
        text = (f"{row['ms_per_step']:.2f} ms/step {row['tok_s']:.1f} tok/s ({row['floor_frac']:.0%} of floor "
                f"{floor:.2f} ms)" if "tok_s" in row else row.get("err") or row.get("skipped"))
        progress.line(f"ctx {ctx} B={batch} {label} {mode}: {text}")
        C.write_results(out, "e2e", info, results)
    print(f"# wrote {len(results)} rows to {out}", flush=True)
    return results


if __name__ == "__main__":
    main()
