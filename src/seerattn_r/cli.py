"""The ``seerattn-r`` command line.

``info`` and ``demo`` live here; the model and training commands register themselves from
their own packages (``integrations.cli``, ``training.cli``) so this file stays small.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys

import torch

# Packages that add subcommands through a ``register(subparsers)`` function.
_COMMAND_MODULES = ("seerattn_r.integrations.cli", "seerattn_r.training.cli")


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # noqa: BLE001 - report, do not fail
        return f"not available ({type(exc).__name__})"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cmd_info(args: argparse.Namespace) -> int:
    from seerattn_r import __version__, backend

    print(f"seerattn-r {__version__}, Python {platform.python_version()}")
    for module in ("torch", "triton", "tilelang", "transformers"):
        print(f"  {module:<13}{_version(module)}")
    device = _default_device()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        arch = getattr(props, "gcnArchName", None) or f"sm_{props.major}{props.minor}"
        kind = "ROCm" if torch.version.hip else "CUDA"
        print(f"device: {props.name} ({kind}, {arch}, {props.multi_processor_count} SMs/CUs)")
    else:
        print("device: cpu (no CUDA/ROCm GPU visible)")
    print(f"{backend.ENV_VAR}={backend.requested()}")
    print("backend that auto picks, per op:")
    rows = backend.describe(device)
    width = max(len(op) for op, _, _ in rows) + 2
    for op, chosen, why in rows:
        print(f"  {op:<{width}}{chosen:<10}{why}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """A small sparse decode on the default device, checked against the reference."""
    from seerattn_r import backend, ops, reference

    device = _default_device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    batch, hq, hkv, d, bs, seqlen = 2, 16, 4, 128, 64, args.tokens
    nblk = math.ceil(seqlen / bs)
    keep = max(1, round(nblk * (1 - args.sparsity)))

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rand(batch, hq, d), rand(batch, seqlen, hkv, d), rand(batch, seqlen, hkv, d)
    lens = torch.tensor([seqlen, seqlen - bs // 2], dtype=torch.int32, device=device)
    idx = torch.stack([torch.randperm(nblk, generator=gen)[:keep] for _ in range(batch * hkv)])
    idx = idx.view(batch, hkv, keep).to(device=device, dtype=torch.int32)
    name = backend.resolve_name(device)
    out = ops.sparse_decode(q, k, v, lens, idx, bs)
    ref, _ = reference.sparse_decode(q.float(), k.float(), v.float(), lens, idx, bs, d**-0.5, None)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    print(
        f"sparse_decode on {device} with the {name} backend: batch {batch}, {seqlen} tokens, "
        f"{keep}/{nblk} blocks of {bs} ({args.sparsity:.0%} sparse), {str(dtype)[6:]}: "
        f"relative error vs reference {err:.2e}"
    )
    return 0 if err < 2e-2 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seerattn-r", description="SeerAttention-R sparse decoding for long reasoning models"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, and the backend auto picks for each op")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="run a small sparse decode and check it against the reference")
    demo.add_argument("--tokens", type=int, default=4096, help="cache length (default 4096)")
    demo.add_argument("--sparsity", type=float, default=0.9, help="fraction of blocks skipped")
    demo.set_defaults(func=cmd_demo)
    for module in _COMMAND_MODULES:
        try:
            commands = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not exc.name or not module.startswith(exc.name):
                raise  # a dependency of the command module is missing: say so
            continue
        commands.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
