"""seerattn-r: SeerAttention-R sparse decoding for long reasoning models.

A small learned gate per attention layer picks which blocks of the KV cache matter, and a
block-sparse flash-decoding kernel reads only those. The ops live in
:mod:`seerattn_r.ops`; the backend is chosen by ``SEERATTN_BACKEND`` (see
:mod:`seerattn_r.backend`).
"""

from __future__ import annotations

import importlib

from seerattn_r import ops
from seerattn_r.backend import use_backend

__version__ = "0.1.0"

# Model-facing pieces import transformers; load them on first use only.
_LAZY = {
    "AttnGate": "seerattn_r.gate",
    "SparseDecodeConfig": "seerattn_r.config",
    "patch_model": "seerattn_r.integrations",
    "unpatch_model": "seerattn_r.integrations",
}

__all__ = ["ops", "use_backend", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'seerattn_r' has no attribute {name!r}")
