"""Fidelity of sparse decoding on a real model: trained gate vs oracle vs Quest, offline.

Three steps (see ``seerattn_r.eval`` for the definitions):

``prepare``: split champ-dataset's 270 problems into train / held-out by problem (seeded;
``split.json``), write ``train.jsonl`` (the training documents) and ``heldout.json``
(one sequence of ``--seq-len`` tokens per held-out problem)::

    python benchmarks/fidelity.py prepare --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --out data/champ

``run``: on ``--num-seqs`` held-out sequences, for every selection method and token
budget, teacher-forced sparse decoding of every position past ``--eval-start`` in one
forward; writes the JSON (and the plot) under ``benchmarks/results/``::

    python benchmarks/fidelity.py run --model M.gguf --data data/champ --gates gates/smollm2-b64

``plot``: perplexity change and top-1 agreement against the budget, one line per method
(and block size, when several result files are given)::

    python benchmarks/fidelity.py plot benchmarks/results/fidelity-*.json --out fidelity.png
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_prepare(args) -> int:
    from seerattn_r.eval.data import prepare_champ
    from seerattn_r.loading import load_tokenizer

    if args.model is None:
        from seerattn_r.training.data import ByteTokenizer

        tokenizer = ByteTokenizer(256)  # the random-weight Qwen3's (seerattn_r.loading)
    else:
        tokenizer = load_tokenizer(args.model, args.gguf_file)
    split = prepare_champ(args.out, tokenizer, args.seq_len, args.heldout_fraction, args.seed,
                          args.max_train_chars)
    held = json.loads((Path(args.out) / "heldout.json").read_text())
    print(f"{len(split['train'])} train / {len(split['heldout'])} held-out problems (seed {args.seed}); "
          f"{len(held['sequences'])} held-out sequences of {args.seq_len} tokens in {args.out}")
    return 0


def _gates(args, model, device):
    if args.gates is None:
        return None, None, None
    from seerattn_r.training.cli import load_gate_modules

    gates, block_size = load_gate_modules(args.gates, model.config, device)
    gates = gates.to(dtype=next(model.parameters()).dtype)
    cfg = json.loads((Path(args.gates) / "config.json").read_text())
    return list(gates), block_size, cfg


def _info(device: torch.device) -> dict:
    # No argv: it holds local paths, and the settings are recorded field by field.
    import platform

    import transformers

    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cmd_run(args) -> int:
    from seerattn_r.eval.data import load_heldout
    from seerattn_r.eval.fidelity import evaluate, format_table

    device = _device(args.device)
    from seerattn_r.loading import load_model

    model, _ = load_model(args.model, args.gguf_file, dtype=DTYPES[args.dtype], device=device)
    gates, gate_block, gate_cfg = _gates(args, model, device)
    methods = list(args.methods)
    if gates is None and "gate" in methods:
        print("note: no --gates given, so the 'gate' method is skipped", file=sys.stderr)
        methods.remove("gate")
    block_size = args.block_size or gate_block or 64
    if gate_block is not None and block_size != gate_block:
        print(f"error: --block-size {block_size} but the gates were trained with {gate_block}", file=sys.stderr)
        return 2
    held = load_heldout(args.data)
    chosen = held["sequences"][: args.num_seqs]
    seq_len = args.seq_len or held["seq_len"]
    sequences = [torch.tensor(s["input_ids"][:seq_len]) for s in chosen]
    chunk = args.chunk or (1024 if device.type == "cuda" else 256)
    start = time.perf_counter()

    def progress(method: str, budget: int, index: int) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] sequence {index + 1}/{len(sequences)}: "
              f"{method}{f' @ {budget}' if budget else ''}", flush=True)

    split = json.loads((Path(args.data) / "split.json").read_text())
    out = args.out or RESULTS_DIR / f"fidelity-b{block_size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(result: dict) -> None:
        # Written after every sequence, so a run cut short by a time limit keeps its data.
        result.update(
            bench="fidelity", info=_info(device), chunk=chunk,
            model="random-qwen3" if args.model is None else (args.gguf_file or Path(args.model).name),
            model_dtype=args.dtype, block_size=block_size, eval_start=args.eval_start, seq_len=seq_len,
            sequences=[s["problem"] for s in chosen[: result["sequences_done"]]], split_seed=split["seed"],
            gates=None if args.gates is None else {"path": Path(args.gates).name, "config": gate_cfg,
                                                   "training": _training_summary(Path(args.gates))},
            seconds=round(time.perf_counter() - start, 1),
        )
        out.write_text(json.dumps(result, indent=1) + "\n")

    result = evaluate(model, sequences, block_size, gates, methods, args.budgets, args.eval_start, chunk,
                      on_run=progress if not args.quiet else None, on_sequence=save)
    print(format_table(result))
    print(f"results written to {out}")
    if not args.no_plot:
        print(f"plot written to {plot([out], out.with_suffix('.png'))}")
    return 0


def _training_summary(gates_dir: Path) -> dict | None:
    """What ``seerattn-r train`` logged (``train_log.json``), in short."""
    log = gates_dir / "train_log.json"
    if not log.is_file():
        return None
    data = json.loads(log.read_text())
    hist = data.get("history", [])
    summary = {"steps": len(hist), "heldout_kl": data.get("heldout_kl"), "note": data.get("note")}
    if hist:
        tail = hist[-10:]
        summary.update(loss_first=hist[0]["loss"], loss_last10=sum(h["loss"] for h in tail) / len(tail),
                       tokens_per_s=sum(h["tokens_per_s"] for h in tail) / len(tail))
    return summary


def cmd_export_gates(args) -> int:
    """Rewrite a training output folder's gates in bf16 (half the size, the published
    dtype), from its final gates or, when training was cut short, its last checkpoint."""
    from seerattn_r.checkpoint import SAFETENSORS_FILE, load_gates, save_gates
    from seerattn_r.training.trainer import CHECKPOINT

    root = Path(args.dir)
    if (root / SAFETENSORS_FILE).is_file():
        state, config = load_gates(root)
    elif (root / CHECKPOINT).is_file():
        ckpt = torch.load(root / CHECKPOINT, map_location="cpu", weights_only=True)
        state = ckpt["gates"]
        config = {"seerattn_gate_block_size": ckpt["config"]["block_size"], "base_model": args.base_model}
        note = (f"training stopped at step {ckpt['step']} of {ckpt['config']['steps']} (time limit); "
                "gates from the last checkpoint")
        (root / "train_log.json").write_text(json.dumps({"history": ckpt["history"], "note": note}, indent=1) + "\n")
        print(note)
    else:
        print(f"error: {root} holds neither gates nor a training checkpoint", file=sys.stderr)
        return 2
    if args.base_model:
        config["base_model"] = args.base_model
    save_gates({k: v.to(torch.bfloat16) for k, v in state.items()}, config, root)
    size = (root / SAFETENSORS_FILE).stat().st_size
    print(f"bf16 gates written to {root / SAFETENSORS_FILE} ({size / 2**20:.1f} MiB)")
    return 0


def plot(paths: list[Path], out: Path) -> Path:
    """Perplexity change (%) and top-1 agreement (%) against the token budget, one line per
    (method, block size) over the result files ``paths``; written to ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(Path(p).read_text()) for p in paths]
    several = len({r["block_size"] for r in results}) > 1
    fig, (ax_ppl, ax_top1) = plt.subplots(1, 2, figsize=(11, 4.2))
    for res in results:
        for method in dict.fromkeys(r["method"] for r in res["runs"]):
            runs = sorted((r for r in res["runs"] if r["method"] == method), key=lambda r: r["budget"])
            label = f"{method} (block {res['block_size']})" if several else method
            x = [r["budget"] for r in runs]
            ax_ppl.plot(x, [100 * r["ppl_change"] for r in runs], marker="o", label=label)
            ax_top1.plot(x, [100 * r["top1_agreement"] for r in runs], marker="o", label=label)
    first = results[0]
    budgets = sorted({r["budget"] for res in results for r in res["runs"]})
    for ax, ylabel in ((ax_ppl, "perplexity change vs dense (%)"), (ax_top1, "top-1 agreement with dense (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("token budget")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_ppl.axhline(0.0, color="black", linewidth=0.8)
    fig.suptitle(f"{Path(first['model']).name}: {len(first['sequences'])} held-out sequence(s) of "
                 f"{first['seq_len']} tokens, sparse past token {first['eval_start']}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def cmd_plot(args) -> int:
    print(f"plot written to {plot(args.results, args.out)}")
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="transformers folder or .gguf file (default: a random-weight Qwen3)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")


def build_parser() -> argparse.ArgumentParser:
    from seerattn_r.eval.fidelity import BUDGETS, METHODS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="split champ-dataset by problem and write train/held-out data")
    _model_args(prep)
    prep.add_argument("--out", type=Path, required=True, help="output folder")
    prep.add_argument("--seq-len", type=int, default=8192, help="tokens per held-out sequence (default 8192)")
    prep.add_argument("--heldout-fraction", type=float, default=0.2)
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--max-train-chars", type=int, help="cap on each training document's characters")
    prep.set_defaults(func=cmd_prepare)

    run = sub.add_parser("run", help="evaluate dense vs sparse on held-out sequences")
    _model_args(run)
    run.add_argument("--data", type=Path, required=True, help="a folder written by `prepare`")
    run.add_argument("--gates", type=Path, help="trained gate directory (without it: oracle and Quest only)")
    run.add_argument("--block-size", type=int, help="default: the gates' block size, else 64")
    run.add_argument("--num-seqs", type=int, default=4, help="held-out sequences to evaluate (default 4)")
    run.add_argument("--seq-len", type=int, help="truncate the sequences to this many tokens")
    run.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    run.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    run.add_argument("--eval-start", type=int, default=1024,
                     help="positions before this decode densely and are not scored (default 1024)")
    run.add_argument("--chunk", type=int, help="query rows per attention chunk (default 1024 GPU, 256 CPU)")
    run.add_argument("--dtype", choices=DTYPES, default="fp32", help="model dtype (default fp32)")
    run.add_argument("--device", default="auto")
    run.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/fidelity-b<bs>.json)")
    run.add_argument("--no-plot", action="store_true")
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(func=cmd_run)

    ex = sub.add_parser("export-gates", help="rewrite a `seerattn-r train` output's gates in bf16")
    ex.add_argument("dir", type=Path)
    ex.add_argument("--base-model", default="", help="the base model's name to record in config.json")
    ex.set_defaults(func=cmd_export_gates)

    pl = sub.add_parser("plot", help="plot result files")
    pl.add_argument("results", type=Path, nargs="+")
    pl.add_argument("--out", type=Path, required=True)
    pl.set_defaults(func=cmd_plot)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
