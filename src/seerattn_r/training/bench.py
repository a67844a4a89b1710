"""GPU measurements for gate training (issue 7): ``python -m seerattn_r.training.bench``.

1. ``kernel``: the ground-truth op ``attn_block_max`` (Triton) for one sequence of
   ``--seq-len`` tokens with Qwen3-4B-shaped attention (32 query / 8 KV heads, head dim
   128, bf16, block 64) against PyTorch SDPA's flash forward on the same shape. It is
   first checked against the torch reference at 4k tokens.
2. ``train``: gate-training throughput (tokens/s) and peak memory for a Qwen3-4B-shaped
   random-weight model (bf16) at ``--seq-len`` tokens per packed row.

Prints one JSON line per measurement and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def _time_cuda(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs (CUDA events, warm-up excluded)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def bench_kernel(seq_len: int, block_size: int = 64) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from seerattn_r.backend import use_backend
    from seerattn_r.ops.attn_block_max import attn_block_max
    from seerattn_r.reference.attn_block_max import attn_block_max as reference

    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)

    def inputs(s):
        return (torch.randn(1, s, 32, 128, device=dev, dtype=dt, generator=gen),
                torch.randn(1, s, 8, 128, device=dev, dtype=dt, generator=gen),
                torch.randn(1, s, 8, 128, device=dev, dtype=dt, generator=gen))

    q, k, v = inputs(4096)
    with use_backend("triton"):
        out, bm = attn_block_max(q, k, v, block_size)
    ref_out, ref_bm = reference(q.float(), k.float(), v.float(), block_size, 1 / math.sqrt(128), None, 4096)
    err_out = float((out.float() - ref_out).norm() / ref_out.norm())
    err_bm = float((bm - ref_bm).norm() / ref_bm.norm())
    if err_out > 2e-2 or err_bm > 1e-3:
        raise AssertionError(f"attn_block_max disagrees with the reference: out {err_out:.2e}, block_max {err_bm:.2e}")
    del ref_out, ref_bm, out, bm

    q, k, v = inputs(seq_len)
    with use_backend("triton"):
        ms_gt = _time_cuda(lambda: attn_block_max(q, k, v, block_size))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(4, 1), v.transpose(1, 2).repeat_interleave(4, 1)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms_sdpa = _time_cuda(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True))
    flops = 4 * seq_len * seq_len / 2 * 128 * 32  # causal QK^T + PV
    return {"what": "attn_block_max vs sdpa flash", "seq_len": seq_len, "heads": "32/8", "head_dim": 128,
            "block_size": block_size, "check_rel_err_out": err_out, "check_rel_err_block_max": err_bm,
            "ms_attn_block_max": ms_gt, "ms_sdpa_flash": ms_sdpa, "ratio": ms_gt / ms_sdpa,
            "tflops_sdpa": flops / ms_sdpa / 1e9, "device": torch.cuda.get_device_name()}


def bench_train(seq_len: int, steps: int, layers: int | None, block_size: int = 64, gate_dim: int = 128) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from seerattn_r.gate import build_gates
    from seerattn_r.training.data import PackedDataset
    from seerattn_r.training.trainer import GateTrainer, TrainConfig

    settings = dict(QWEN3_4B)
    if layers is not None:
        settings["num_hidden_layers"] = layers
    dev = torch.device("cuda")
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:
            model = Qwen3ForCausalLM(Qwen3Config(**settings)).eval()
    finally:
        torch.set_default_dtype(default)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, settings["vocab_size"], size=seq_len, dtype=np.int32) for _ in range(steps + 1)]
    config = TrainConfig(block_size=block_size, gate_dim=gate_dim, steps=steps + 1, seq_len=seq_len, grad_accum=1,
                         warmup_steps=1)
    trainer = GateTrainer(model, build_gates(model.config, gate_dim), PackedDataset(docs, seq_len, 0), config)
    trainer.train_step()  # compile and warm up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"what": "gate training, Qwen3-4B shape, random weights", "layers": settings["num_hidden_layers"],
            "seq_len": seq_len, "block_size": block_size, "gate_dim": gate_dim, "steps_timed": steps,
            "tokens_per_s": steps * seq_len / elapsed, "s_per_row": elapsed / steps,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "weights_gib": weights / 2**30,
            "device": torch.cuda.get_device_name()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seerattn_r.training.bench", description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="*", help="kernel and/or train (default both)")
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps (one 32k row each)")
    parser.add_argument("--layers", type=int, help="fewer layers than Qwen3-4B's 36 (quick runs)")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args(argv)
    args.what = args.what or ["kernel", "train"]
    if set(args.what) - {"kernel", "train"}:
        parser.error(f"measurements are 'kernel' and 'train', got {args.what}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA/ROCm GPU")
    results = []
    for what in args.what:
        r = bench_kernel(args.seq_len) if what == "kernel" else bench_train(args.seq_len, args.steps, args.layers)
        print(json.dumps(r), flush=True)
        results.append(r)
        torch.cuda.empty_cache()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
