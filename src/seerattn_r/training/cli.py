"""``seerattn-r train`` and ``seerattn-r eval-gates`` (registered by ``seerattn_r.cli``)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

from seerattn_r.config import BLOCK_SIZES


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _model_and_tokenizer(args, device: torch.device):
    """``(model, tokenizer, name)``; ``name`` (recorded as the gates' ``base_model``) is the
    model's file or folder name, never a path of this machine."""
    from seerattn_r.loading import load_model
    from seerattn_r.training.data import ByteTokenizer
    from seerattn_r.training.models import random_qwen3

    if args.model is None:
        model = random_qwen3(seed=args.seed).to(device)
        return model, ByteTokenizer(model.config.vocab_size), "random-qwen3"
    model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, device=device)
    return model, tokenizer, Path(args.gguf_file or args.model).name


def _documents(args, tokenizer) -> list[np.ndarray]:
    from seerattn_r.training.data import load_documents, tokenize

    if args.data is None:
        # No data: random token streams, so the command runs anywhere (a smoke run).
        rng = np.random.default_rng(args.seed)
        vocab = getattr(tokenizer, "vocab_size", 256)
        return [rng.integers(0, vocab, size=args.seq_len, dtype=np.int32) for _ in range(64)]
    return tokenize(load_documents(args.data), tokenizer)


def _split_rows(args, docs):
    """(train dataset, held-out rows) with the document-level split fixed by the seed."""
    from seerattn_r.training.data import PackedDataset, split_documents

    train, held = split_documents(docs, args.eval_fraction, args.seed)
    held_rows = []
    if held and sum(len(d) for d in held) >= args.seq_len:
        held_ds = PackedDataset(held, args.seq_len, args.seed)
        held_rows = [held_ds[i] for i in range(min(args.eval_rows, held_ds.rows_per_epoch))]
    return train, held_rows


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="local transformers model folder or .gguf file "
                   "(default: a small random-weight Qwen3)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--data", type=Path, help=".txt, .jsonl (text or messages) or .parquet file")
    p.add_argument("--seq-len", type=int, default=32768, help="tokens per packed row (default 32768)")
    p.add_argument("--eval-fraction", type=float, default=0.05,
                   help="share of documents held out from training, split by document (default 0.05)")
    p.add_argument("--eval-rows", type=int, default=4, help="held-out rows to evaluate (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")


def cmd_train(args) -> int:
    from seerattn_r.checkpoint import save_gates
    from seerattn_r.gate import build_gates
    from seerattn_r.training.data import PackedDataset
    from seerattn_r.training.trainer import CHECKPOINT, GateTrainer, TrainConfig

    device = _device(args.device)
    config = TrainConfig(
        block_size=args.block_size, gate_dim=args.gate_dim, steps=args.steps, seq_len=args.seq_len,
        grad_accum=args.grad_accum, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, loss_scale=args.loss_scale, loss_slice_ratio=args.loss_slice_ratio,
        seed=args.seed, save_every=args.save_every,
    )
    out = Path(args.out)
    if (out / CHECKPOINT).exists() and not args.resume:
        print(f"error: {out} holds a training checkpoint; pass --resume to continue it, or pick another --out",
              file=sys.stderr)
        return 2
    model, tokenizer, name = _model_and_tokenizer(args, device)
    train_docs, held_rows = _split_rows(args, _documents(args, tokenizer))
    data = PackedDataset(train_docs, args.seq_len, args.seed)
    torch.manual_seed(args.seed)
    trainer = GateTrainer(model, build_gates(model.config, args.gate_dim), data, config)
    if args.resume and trainer.load_checkpoint(out):
        print(f"resuming at step {trainer.step} of {config.steps}")
    print(f"training gates for {name}: {len(model.base_model.layers)} layers, {data.rows_per_epoch} rows of "
          f"{args.seq_len} tokens per epoch, {config.steps} steps x {config.grad_accum} rows")
    trainer.train(out, progress=not args.no_progress)
    save_gates(trainer.gates.state_dict(), {"seerattn_gate_block_size": args.block_size, "base_model": name}, out)
    summary = {"history": trainer.history}
    if held_rows:
        summary["heldout_kl"] = trainer.heldout_kl(held_rows)
        print(f"held-out KL per layer: {', '.join(f'{x:.4f}' for x in summary['heldout_kl'])}")
    (out / "train_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"gates written to {out}")
    return 0


def load_gate_modules(path: Path, model_config, device: torch.device):
    """``(gates nn.ModuleList on device, block_size)`` from a gate directory."""
    from seerattn_r.checkpoint import load_gates
    from seerattn_r.gate import build_gates

    state, cfg = load_gates(path)
    gates = build_gates(model_config, cfg["seerattn_gate_hidden_size"])
    short = {re.sub(r"^model\.layers\.(\d+)\.self_attn\.attn_gate\.", r"\1.", k): v for k, v in state.items()}
    gates.load_state_dict({k: v.float() for k, v in short.items()})
    return gates.to(device), cfg["seerattn_gate_block_size"]


def cmd_eval_gates(args) -> int:
    from seerattn_r.training.data import PackedDataset
    from seerattn_r.training.evaluate import evaluate_gates, format_table

    device = _device(args.device)
    model, tokenizer, _ = _model_and_tokenizer(args, device)
    gates, block_size = load_gate_modules(args.gates, model.config, device)
    docs = _documents(args, tokenizer)
    if args.all:
        ds = PackedDataset(docs, args.seq_len, args.seed)
        rows = [ds[i] for i in range(min(args.eval_rows, ds.rows_per_epoch))]
    else:
        _, rows = _split_rows(args, docs)
    if not rows:
        print("error: the held-out documents hold less than one row; lower --seq-len or pass --all",
              file=sys.stderr)
        return 2
    result = evaluate_gates(model, gates, rows, block_size, tuple(args.budgets), stride=args.stride)
    print(format_table(result))
    out = args.json or Path(args.gates) / "eval.json"
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"results written to {out}")
    return 0


def register(subparsers) -> None:
    """Add ``train`` and ``eval-gates`` to the ``seerattn-r`` command line."""
    train = subparsers.add_parser("train", help="train AttnGates by self-distillation from a frozen model")
    _common(train)
    train.add_argument("--out", required=True, help="output directory (gates, checkpoint, log)")
    train.add_argument("--block-size", type=int, default=64, choices=BLOCK_SIZES)
    train.add_argument("--gate-dim", type=int, default=128)
    train.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800)")
    train.add_argument("--grad-accum", type=int, default=16, help="packed rows per step (default 16)")
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--min-lr", type=float, default=1e-5)
    train.add_argument("--warmup-steps", type=int, default=20)
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--loss-scale", type=float, default=10.0)
    train.add_argument("--loss-slice-ratio", type=float, default=0.5)
    train.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ev = subparsers.add_parser("eval-gates", help="KL and attention recall of trained gates vs oracle and Quest")
    _common(ev)
    ev.add_argument("--gates", type=Path, required=True, help="gate directory (our format or published)")
    ev.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ev.add_argument("--stride", type=int, default=16, help="evaluate every N-th position (default 16)")
    ev.add_argument("--all", action="store_true", help="evaluate every document, not the held-out split")
    ev.add_argument("--json", type=Path, help="where to write the results (default GATES/eval.json)")
    ev.set_defaults(func=cmd_eval_gates)
