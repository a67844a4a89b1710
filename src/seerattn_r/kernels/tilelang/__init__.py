"""TileLang kernels for NVIDIA Hopper (sm_90): the fast path of :mod:`seerattn_r.ops`.

``tilelang`` is an optional dependency (``pip install seerattn-r[tilelang]``): nothing here
imports it at module import time, so ``import seerattn_r`` works without it.
"""

from __future__ import annotations

import functools
import importlib

import torch

__all__ = ["tilelang_unavailable_reason"]

INSTALL_HINT = "pip install seerattn-r[tilelang]"


@functools.cache
def _import_failure() -> str | None:
    try:
        importlib.import_module("tilelang")
    except ModuleNotFoundError:
        return f"tilelang is not installed ({INSTALL_HINT})"
    except Exception as exc:  # noqa: BLE001 - a broken install is as unusable as none
        return f"tilelang does not import ({type(exc).__name__}: {exc})"
    return None


def tilelang_unavailable_reason(device: torch.device | str) -> str | None:
    """Why the TileLang kernels cannot run on ``device``; None when they can.

    They need a CUDA device of compute capability 9.0 (Hopper: wgmma and TMA) and an
    importable ``tilelang``. The device is checked first so that the message on a
    non-Hopper machine does not depend on what is installed.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return f"not a CUDA device ({device.type}); TileLang kernels need an NVIDIA Hopper GPU (sm_90)"
    if torch.version.hip is not None:
        return "needs an NVIDIA Hopper GPU (sm_90), found a ROCm device"
    if not torch.cuda.is_available():
        return "CUDA is not available in this torch build or on this machine"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) != (9, 0):
        return f"needs an NVIDIA Hopper GPU (sm_90), found sm_{major}{minor}"
    return _import_failure()
