"""Helpers shared by the Triton kernels: interpreter switch, device facts, AOT signatures."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Triton signature type of each tensor dtype the kernels accept (for AOT compilation).
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (read at launch time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _multi_processor_count(device_type: str, index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def compute_units(device: torch.device) -> int:
    """Number of SMs (NVIDIA) or CUs (AMD) of ``device``; CPU cores under the interpreter.

    Cached per device: the query costs a driver call, and the plan runs every decode step.
    """
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _multi_processor_count(device.type, index)
    return os.cpu_count() or 1


@triton.jit
def dot(a, b, INTERPRET: tl.constexpr):
    """``tl.dot(a, b)`` with an fp32 accumulator.

    The interpreter computes bf16 dots wrongly, so there (only) the tiles go through fp32.
    ``ieee`` keeps fp32 inputs exact instead of TF32; it does not affect fp16/bf16 inputs.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="ieee")
