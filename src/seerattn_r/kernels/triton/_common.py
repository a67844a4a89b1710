"""Helpers shared by the Triton kernels: interpreter switch, device facts, AOT signatures."""

from __future__ import annotations

import dataclasses
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


def is_hip() -> bool:
    """True on ROCm builds of torch (AMD GPUs)."""
    return torch.version.hip is not None


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


@dataclasses.dataclass(frozen=True)
class AotConfig:
    """One ahead-of-time build of a kernel, as ``triton.compile(ASTSource(...))`` takes it.

    ``signature`` names every argument: ``"*fp16"``-style pointers, ``"i32"``/``"fp32"``
    scalars, ``"constexpr"`` for the ones fixed in ``constexprs``. ``attrs`` marks the
    arguments a launch specializes as divisible by 16 (as the JIT does for aligned pointers
    and strides), so the build vectorizes and pipelines like the real one.
    ``matrix_cores``: the build must use tensor cores (mma/wgmma on NVIDIA, mfma on AMD).
    ``hip_options`` override ``options`` for AMD targets (e.g. fewer stages for 64 KiB LDS).
    """

    name: str
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    hip_options: dict
    matrix_cores: bool = False

    def options_for(self, backend: str) -> dict:
        """Compile options for a target backend (``"cuda"`` or ``"hip"``)."""
        return dict(self.options, **self.hip_options) if backend == "hip" else dict(self.options)


def aot_config(name: str, fn, types: dict, constexprs: dict, matrix_cores: bool = False,
               hip_options: dict | None = None, **options) -> AotConfig:
    """An :class:`AotConfig` for ``fn`` from the types of its run-time arguments.

    Pointers and ``stride_*`` arguments count as divisible by 16 (what the kernels see with
    16-byte aligned tensors and head dims that are multiples of 16). Fails when an argument
    is neither typed nor fixed, so a kernel's signature change cannot leave its list stale.
    """
    untyped = [a for a in fn.arg_names if a not in types and a not in constexprs]
    unknown = sorted((set(types) | set(constexprs)) - set(fn.arg_names))
    if untyped or unknown:
        raise ValueError(f"{name}: untyped arguments {untyped}, unknown arguments {unknown}")
    signature = {a: "constexpr" if a in constexprs else types[a] for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if a in types and (types[a].startswith("*") or a.startswith("stride_"))}
    return AotConfig(name, fn, signature, dict(constexprs), attrs, options, hip_options or {}, matrix_cores)
