"""Which implementation of an op runs: the one module that knows backend names.

The backend is chosen per call, in this order:

1. the innermost :func:`use_backend` context, if any;
2. the environment variable ``SEERATTN_BACKEND`` (read at call time, so a test or a
   long-running process can switch it);
3. ``auto``.

Backends:

``torch``     the pure-PyTorch reference (:mod:`seerattn_r.reference`); any device.
``triton``    portable Triton kernels (:mod:`seerattn_r.kernels.triton`); CUDA and ROCm
              GPUs, and CPU tensors when ``TRITON_INTERPRET=1`` (the interpreter, for
              tests).
``tilelang``  the Hopper kernels (:mod:`seerattn_r.kernels.tilelang`); NVIDIA sm_90 with
              ``tilelang`` installed. Ops without a TileLang kernel run their Triton
              kernel under this backend (``seerattn-r info`` lists which). On the H100
              its ``sparse_decode`` is exact, faster than the Triton kernel at all 48
              points of the issue grid (batch 1/2/4/16; 0.66-0.998x per CUDA-graph
              replay) and faster than the official SeerAttention-R kernel at all 12 of
              its points (``benchmarks/results/tilelang_sparse_decode_h100.json``). Its
              first call per (dtype, head dims, block size, GQA group padded to
              8/16/32/64, small-batch cluster size) compiles for about 15 s; TileLang's
              on-disk cache serves later processes.
``auto``      ``tilelang`` on sm_90 when ``tilelang`` imports, else ``triton`` on any
              CUDA/ROCm GPU, else ``torch`` on CPU.

Asking for a backend that cannot run on the tensors' device is a ``ValueError`` that says
why and lists the choices; there is no silent fallback.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("torch", "triton", "tilelang")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "SEERATTN_BACKEND"
# Backends ``auto`` tries, in order, before falling back to the torch reference.
AUTO_ORDER = ("tilelang", "triton")

# op -> backend -> "module:function". Imported lazily so that importing seerattn_r never
# imports triton or tilelang. An op missing under "tilelang" uses its Triton kernel there.
_IMPLS: dict[str, dict[str, str]] = {
    "sparse_decode": {
        "torch": "seerattn_r.reference.sparse_decode:sparse_decode",
        "triton": "seerattn_r.kernels.triton.sparse_decode:sparse_decode",
        "tilelang": "seerattn_r.kernels.tilelang.sparse_decode:sparse_decode",
    },
    "kpool": {
        "torch": "seerattn_r.reference.kpool:kpool",
        "triton": "seerattn_r.kernels.triton.kpool:kpool",
    },
    "gate_scores": {
        "torch": "seerattn_r.reference.gate_scores:gate_scores",
        "triton": "seerattn_r.kernels.triton.gate_scores:gate_scores",
    },
    "select_blocks": {
        "torch": "seerattn_r.reference.select_blocks:select_blocks",
        "triton": "seerattn_r.kernels.triton.select_blocks:select_blocks",
    },
    "gate_select": {
        "torch": "seerattn_r.reference.gate_select:gate_select",
        "triton": "seerattn_r.kernels.triton.gate_select:gate_select",
    },
    "gate_project_q": {
        "torch": "seerattn_r.reference.gate_project_q:gate_project_q",
        "triton": "seerattn_r.kernels.triton.gate_project_q:gate_project_q",
    },
    "gate_keys": {
        "torch": "seerattn_r.reference.gate_cache:gate_keys",
        "triton": "seerattn_r.kernels.triton.gate_cache:gate_keys",
    },
    "gate_cache_append": {
        "torch": "seerattn_r.reference.gate_cache:gate_cache_append",
        "triton": "seerattn_r.kernels.triton.gate_cache:gate_cache_append",
    },
    "attn_block_max": {
        "torch": "seerattn_r.reference.attn_block_max:attn_block_max",
        "triton": "seerattn_r.kernels.triton.attn_block_max:attn_block_max",
    },
}

OPS = tuple(_IMPLS)

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "seerattn_backend_override", default=None
)


def _check_name(name: str, where: str) -> str:
    name = name.strip().lower()
    if name not in CHOICES:
        raise ValueError(
            f"{where}={name!r} is not a seerattn backend; choose one of {', '.join(CHOICES)}"
        )
    return name


def requested() -> str:
    """The backend asked for right now: the innermost :func:`use_backend`, else the
    ``SEERATTN_BACKEND`` environment variable, else ``auto``."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto", ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops in this block with backend ``name`` (one of :data:`CHOICES`),
    overriding ``SEERATTN_BACKEND``.

    >>> with use_backend("torch"):
    ...     out = seerattn_r.ops.sparse_decode(q, k, v, seqlens, idx, 64)
    """
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


@functools.cache
def _module_importable(module: str) -> str | None:
    """None if ``module`` imports, else the reason it does not."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unusable
        return f"{module} does not import ({type(exc).__name__}: {exc})"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "triton":
        if device.type == "cpu":
            if _interpreting():
                return _module_importable("triton")
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type != "cuda":
            return f"Triton needs a CUDA or ROCm device, got {device.type}"
        return _module_importable("triton")
    if backend == "tilelang":
        if device.type != "cuda":
            return f"TileLang needs an NVIDIA Hopper GPU, got a {device.type} tensor"
        from seerattn_r.kernels.tilelang import tilelang_unavailable_reason

        return tilelang_unavailable_reason(device)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(CHOICES)}")


def resolve_name(device: torch.device, name: str | None = None) -> str:
    """The concrete backend (``torch``/``triton``/``tilelang``) that ``name`` (default:
    :func:`requested`) means for tensors on ``device``."""
    device = torch.device(device)
    name = requested() if name is None else _check_name(name, "backend")
    if name == "auto":
        if device.type == "cpu":
            return "torch"  # the Triton interpreter is for tests, never a default
        for candidate in AUTO_ORDER:
            if unavailable_reason(candidate, device) is None:
                return candidate
        return "torch"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise ValueError(
            f"{ENV_VAR}={name!r} cannot run on {device} tensors: {reason}. "
            f"Choose one of {', '.join(CHOICES)} ('auto' picks what this device supports)."
        )
    return name


def _impl_backend(op: str, backend: str) -> str:
    """The backend whose kernel serves ``op`` under ``backend`` (tilelang borrows Triton
    kernels for the ops it has none of)."""
    table = _IMPLS[op]
    if backend in table:
        return backend
    return "triton"


@functools.cache
def _load(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def resolve(op: str, device: torch.device, name: str | None = None) -> Callable:
    """The implementation of ``op`` to call for tensors on ``device``.

    Every implementation takes the op's positional arguments (see :mod:`seerattn_r.ops`),
    with ``sm_scale`` already resolved to a float.
    """
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    backend = _impl_backend(op, resolve_name(device, name))
    return _load(_IMPLS[op][backend])


def describe(device: torch.device) -> list[tuple[str, str, str]]:
    """For ``seerattn-r info``: (op, backend that ``auto`` runs, why) per op."""
    device = torch.device(device)
    rows = []
    for op in OPS:
        chosen = resolve_name(device, "auto")
        served_by = _impl_backend(op, chosen)
        skipped = [
            f"{b}: {r}"
            for b in ("tilelang", "triton")
            if b != chosen and (r := unavailable_reason(b, device)) is not None
        ]
        why = "; ".join(skipped) if skipped else f"first available of {', '.join(AUTO_ORDER)}, torch"
        if served_by != chosen:
            why = f"{chosen} has no {op} kernel, its Triton kernel runs; " + why
        rows.append((op, served_by, why))
    return rows
