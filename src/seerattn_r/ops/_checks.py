"""Argument checks shared by the ops: shapes, dtypes, devices and layout raise
``TypeError``/``ValueError`` naming the argument. They run in the eager implementation and
in the fake one, so ``torch.compile`` reports bad arguments at trace time too.

Checks on tensor *contents* (index and length ranges) need a device-to-host sync, so they
run only when ``SEERATTN_DEBUG=1``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 128, 256)
BLOCK_SIZES = (16, 32, 64, 128)


def debug_enabled() -> bool:
    return os.environ.get("SEERATTN_DEBUG", "0") == "1"


def tensor(name: str, t: object, ndim: int, shape_doc: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc} ({ndim} dims), got {tuple(t.shape)}")
    return t


def dtype_in(name: str, t: torch.Tensor, dtypes: Iterable[torch.dtype]) -> None:
    dtypes = tuple(dtypes)
    if t.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).removeprefix('torch.')}")


def same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension (stride 1), got strides "
            f"{tuple(t.stride())}; other dimensions may be strided views"
        )


def same_device(named: dict[str, torch.Tensor | None]) -> None:
    present = {n: t for n, t in named.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{n} on {t.device}" for n, t in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}")


def int32_vector(name: str, t: object, batch: int, what: str) -> torch.Tensor:
    t = tensor(name, t, 1, f"[B] int32 ({what})")
    dtype_in(name, t, (torch.int32,))
    if t.shape[0] != batch:
        raise ValueError(f"{name} must have shape [B] = [{batch}] ({what}), got {tuple(t.shape)}")
    return t


def one_of(name: str, value: int, allowed: Iterable[int]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value}")


def block_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"block_size must be an int, got {type(value).__name__}")
    one_of("block_size", value, BLOCK_SIZES)
    return value


def debug_lengths(cache_seqlens: torch.Tensor, cache_offsets: torch.Tensor | None, smax: int) -> None:
    """Contents check (syncs): every row's tokens lie inside the cache."""
    if int(cache_seqlens.min()) < 0:
        raise ValueError("cache_seqlens must be >= 0 (SEERATTN_DEBUG check)")
    end = cache_seqlens.long()
    if cache_offsets is not None:
        if int(cache_offsets.min()) < 0:
            raise ValueError("cache_offsets must be >= 0 (SEERATTN_DEBUG check)")
        end = end + cache_offsets.long()
    if int(end.max()) > smax:
        raise ValueError(
            f"cache_offsets + cache_seqlens must be <= the cache length {smax}, got "
            f"{int(end.max())} (SEERATTN_DEBUG check)"
        )
