"""``seerattn-r generate``: sparse generation with a patched model, streamed, with its
sparsity and speed.

    seerattn-r generate --model PATH --gates PATH --token-budget 4096 --prompt "..."

Without ``--model`` a small random-weight Qwen3 (byte tokenizer) is built, so the command
runs anywhere; without ``--gates`` the gates are freshly initialised (their selections are
arbitrary). Nothing is downloaded: a missing path is an error.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

DEFAULT_PROMPT = (
    "Let x be the smallest positive integer such that x^2 + 7x + 12 is divisible by 10. "
    "Think step by step, then give x."
)


class _Streamer:
    """A ``generate`` streamer that prints row 0's new tokens as they come and times them."""

    def __init__(self, tokenizer, out=None) -> None:
        # sys.stdout looked up per stream, not at import: it may have been replaced since.
        self.tokenizer, self.out = tokenizer, out if out is not None else sys.stdout
        self.prompt_seen = False
        self.times: list[float] = []
        self.ids: list[int] = []
        self.printed = ""

    def _text(self) -> str:
        if hasattr(self.tokenizer, "decode"):
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return bytes(i % 256 for i in self.ids).decode("utf-8", errors="replace")

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.ids.append(int(value.reshape(-1)[0]))
        text = self._text()
        # Print only what extends the text (a token may change how its predecessors decode).
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def _parse_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dense-layers takes comma-separated ints, got {text!r}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from seerattn_r.checkpoint import load_gates
    from seerattn_r.config import SparseDecodeConfig
    from seerattn_r.integrations.hf import patch_model, sparsity_stats
    from seerattn_r.loading import load_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    try:
        gates = block_size = None
        if args.gates is not None:
            gates, gate_cfg = load_gates(args.gates)
            block_size = gate_cfg["seerattn_gate_block_size"]
            if args.block_size is not None and args.block_size != block_size:
                raise ValueError(f"--block-size {args.block_size} but the gates were trained with {block_size}")
        model, tokenizer = load_model(args.model, gguf_file=args.gguf_file, dtype=dtype, device=device)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.model is None:
        print("note: no --model, using a small random-weight Qwen3 (its text is noise)", file=sys.stderr)
    if gates is None:
        print("note: no --gates, using freshly initialised gates (arbitrary selections)", file=sys.stderr)
    budget = None if args.threshold is not None else args.token_budget
    config = SparseDecodeConfig(
        block_size=block_size or args.block_size or 64, token_budget=budget, threshold=args.threshold,
        sink_block=not args.no_sink, dense_layers=args.dense_layers, min_sparse_length=args.min_sparse_length,
        selection=args.selection, backend=args.backend, gate_dim=args.gate_dim,
    )
    patch_model(model, config, gates=gates)

    if not callable(tokenizer):  # the random model's byte tokenizer
        ids = torch.tensor([tokenizer.encode(args.prompt)])
    elif getattr(tokenizer, "chat_template", None) and not args.raw:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    ids = ids.to(device).repeat(args.batch, 1)
    streamer = _Streamer(tokenizer)
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, streamer=streamer,
               pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
    if args.temperature > 0:
        gen.update(temperature=args.temperature, top_p=args.top_p)
    if args.static_cache:
        gen["cache_implementation"] = "static"
    if args.seed is not None:
        torch.manual_seed(args.seed)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    stats = sparsity_stats(model)
    times = streamer.times
    decode_s = times[-1] - times[0] if len(times) > 1 else float("nan")
    decode_tps = (len(times) - 1) * args.batch / decode_s if len(times) > 1 else float("nan")
    print(f"--- {ids.shape[1]} prompt tokens, {new} new tokens x batch {args.batch} in {total:.2f} s "
          f"(prefill + first token {times[0] - start if times else total:.2f} s); "
          f"decode {decode_tps:.1f} tokens/s", file=sys.stderr)
    print(f"--- KV cache read per decode step: {stats['density']:.1%} (sparsity {stats['sparsity']:.1%}, "
          f"{config.selection} selection, "
          + (f"budget {config.token_budget} tokens" if budget is not None else f"threshold {config.threshold}")
          + f", block {config.block_size}); gate caches {model._seerattn.memory_bytes() / 2**20:.2f} MiB",
          file=sys.stderr)
    if args.per_layer:
        for row in stats["layers"]:
            print(f"    layer {row['layer']:>3}: read {row['density']:.1%}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    """Add ``generate`` to the ``seerattn-r`` command line."""
    p = subparsers.add_parser("generate", help="generate with sparse decoding (streams tokens, prints sparsity)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local transformers folder or .gguf file (default: small random Qwen3)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--gates", help="gate directory (ours or published SeerAttention-R AttnGates)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="generate this many copies of the prompt together")
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--token-budget", type=int, default=4096, help="tokens read per KV head (default 4096)")
    sel.add_argument("--threshold", type=float, help="keep blocks with gate probability above this instead")
    p.add_argument("--block-size", type=int, help="default: the gates' block size, else 64")
    p.add_argument("--gate-dim", type=int, default=128, help="Dg of fresh gates (without --gates)")
    p.add_argument("--selection", choices=("gate", "oracle", "quest"), default="gate")
    p.add_argument("--min-sparse-length", type=int, help="decode densely up to this length (default: the budget)")
    p.add_argument("--dense-layers", type=_parse_layers, default=(), help="comma-separated layers kept dense")
    p.add_argument("--no-sink", action="store_true", help="do not force block 0")
    p.add_argument("--backend", choices=("auto", "torch", "triton", "tilelang"))
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    p.add_argument("--static-cache", action="store_true", help="use transformers' static KV cache")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int)
    p.add_argument("--per-layer", action="store_true", help="print each layer's share of the cache read")
    p.set_defaults(func=cmd_generate)
