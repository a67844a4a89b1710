"""Test helpers: relative-error comparison, device/backends under test."""

from __future__ import annotations

import os

import torch

# Relative error ||out - ref|| / ||ref|| allowed per output dtype (the reference runs in fp32
# on fp32-upcast inputs, so this is the kernel's own rounding).
RTOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, rtol: float) -> None:
    """Fail on NaN/Inf mismatch, on shape mismatch, or if the relative error exceeds rtol."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out_bad = ~torch.isfinite(out)
    ref_bad = ~torch.isfinite(ref)
    assert not out.isnan().any(), f"{name}: {int(out.isnan().sum())} NaN in output (unwritten or invalid)"
    assert torch.equal(out_bad, ref_bad), f"{name}: non-finite entries differ from the reference"
    if out_bad.any():
        assert torch.equal(out[out_bad], ref[ref_bad]), f"{name}: infinities differ in sign"
        ref, out = ref[~ref_bad], out[~out_bad]
    err = rel_err(ref, out)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.1e}"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cpu_backends() -> list[str]:
    """Backends to test against the reference on CPU: Triton only under the interpreter."""
    return ["triton"] if interpreting() else []


def gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    from seerattn_r import backend

    dev = torch.device("cuda")
    return [b for b in ("triton", "tilelang") if backend.unavailable_reason(b, dev) is None]
