"""Backend choice: environment variable, scoped override, auto, and clear errors."""

from __future__ import annotations

import pytest
import torch

from seerattn_r import backend, ops, reference
from seerattn_r.backend import use_backend


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("SEERATTN_BACKEND", raising=False)
    assert backend.resolve_name(torch.device("cpu")) == "torch"
    assert backend.resolve("kpool", torch.device("cpu")) is reference.kpool


def test_env_read_at_call_time(monkeypatch):
    monkeypatch.setenv("SEERATTN_BACKEND", "torch")
    assert backend.requested() == "torch"
    monkeypatch.setenv("SEERATTN_BACKEND", "auto")
    assert backend.requested() == "auto"


def test_unknown_name_lists_choices(monkeypatch):
    monkeypatch.setenv("SEERATTN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="auto, torch, triton, tilelang"):
        ops.kpool(torch.randn(1, 16, 1, 64), torch.tensor([16], dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="choose one of"):
        with use_backend("fast"):
            pass


def test_context_overrides_env(monkeypatch):
    monkeypatch.setenv("SEERATTN_BACKEND", "tilelang")
    with use_backend("torch"):
        assert backend.resolve_name(torch.device("cpu")) == "torch"
    assert backend.requested() == "tilelang"


def test_backend_that_cannot_run_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with use_backend("triton"), pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        backend.resolve_name(torch.device("cpu"))
    with use_backend("tilelang"), pytest.raises(ValueError, match="Hopper"):
        backend.resolve_name(torch.device("cpu"))


def test_describe_covers_every_op():
    rows = backend.describe(torch.device("cpu"))
    assert [r[0] for r in rows] == list(backend.OPS)
    assert all(r[1] == "torch" for r in rows)


def test_auto_picks_tilelang_on_hopper_else_triton(monkeypatch):
    """auto runs the TileLang kernels where they can run (a Hopper GPU with tilelang, faked
    here) and the Triton ones on any other GPU; the ops TileLang has no kernel for still
    run their Triton kernel."""
    import seerattn_r.kernels.tilelang as tl_kernels

    cuda = torch.device("cuda")
    monkeypatch.delenv("SEERATTN_BACKEND", raising=False)
    monkeypatch.setattr(tl_kernels, "tilelang_unavailable_reason", lambda device: None)
    assert backend.resolve_name(cuda) == "tilelang"
    assert backend._impl_backend("sparse_decode", "tilelang") == "tilelang"
    assert backend._impl_backend("kpool", "tilelang") == "triton"
    monkeypatch.setattr(tl_kernels, "tilelang_unavailable_reason", lambda device: "needs sm_90, found sm_80")
    assert backend.resolve_name(cuda) == "triton"
    with use_backend("tilelang"), pytest.raises(ValueError, match="needs sm_90, found sm_80"):
        backend.resolve_name(cuda)
