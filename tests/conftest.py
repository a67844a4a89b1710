"""Shared fixtures: NaN-poisoned allocations inside op tests and hypothesis profiles.

Profiles: ``ci`` (default: derandomized, few examples, for the CPU interpreter) and ``gpu``
(random, 200 examples per test): ``SEERATTN_HYPOTHESIS=gpu pytest -m gpu``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_common = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile("ci", max_examples=25, derandomize=True, **_common)
settings.register_profile("gpu", max_examples=200, **_common)
settings.register_profile("dev", max_examples=100, **_common)
settings.load_profile(os.environ.get("SEERATTN_HYPOTHESIS", "ci"))


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype in (torch.int32, torch.int64, torch.int16):
        return t.fill_(-(2**15) + 7)  # an index no kernel should ever produce
    return t


@pytest.fixture
def poison_empty(monkeypatch):
    """Make every ``torch.empty``/``empty_like``/``new_empty`` in the test return poisoned
    memory (NaN, or an absurd integer), so an output element a kernel never writes shows."""
    real_empty, real_like, real_new = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_like(*args, **kwargs))

    def new_empty(self, *args, **kwargs):
        return _poison(real_new(self, *args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    monkeypatch.setattr(torch.Tensor, "new_empty", new_empty)
    yield
