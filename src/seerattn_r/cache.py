"""The K compression cache and the pre-RoPE recent-K buffer of one layer, and the decode
plan shared by all layers of a step.

Row addressing follows the ops: row ``b``'s token ``t`` (``t = 0`` its first real token)
sits at KV-cache index ``offsets[b] + t`` and has position ``t``; its block ``j`` holds
tokens ``j*bs .. j*bs+bs-1``. Entry ``j`` of the compression cache is the gate key of
block ``j`` (pooled pre-RoPE keys, projected, normed, RoPE'd at position ``j*bs``); it is
written once, when the block completes, and never recomputed. Everything here runs on
the device without a host sync: which rows complete a block this step is a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seerattn_r import ops
from seerattn_r.gate import AttnGate


def _static(t: torch.Tensor) -> torch.Tensor:
    """Mark a persistent state buffer so CUDA graphs may mutate it in place."""
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(t)
    return t


@dataclass
class DecodePlan:
    """What one decode step shares across layers (computed once, by the first layer).

    All tensors ``[B]`` on the model's device.

    Attributes:
        seqlens: int32, tokens of each row including the current one.
        offsets: int32, KV-cache index of each row's first real token.
        positions: int64, the current token's position (``seqlens - 1``).
        last: int32, the block holding the current token; also the number of scored
            (complete, strictly earlier) blocks.
        slot: int64, the current token's index inside its block.
        completes: bool, the current token is the last of its block.
        dense: bool, the row is still short enough to decode densely.
    """

    seqlens: torch.Tensor
    offsets: torch.Tensor
    positions: torch.Tensor
    last: torch.Tensor
    slot: torch.Tensor
    completes: torch.Tensor
    dense: torch.Tensor

    @classmethod
    def build(cls, positions: torch.Tensor, offsets: torch.Tensor, block_size: int, dense_until: int) -> DecodePlan:
        positions = positions.long()
        seqlens = (positions + 1).to(torch.int32)
        return cls(
            seqlens=seqlens,
            offsets=offsets,
            positions=positions,
            last=torch.div(positions, block_size, rounding_mode="floor").to(torch.int32),
            slot=positions % block_size,
            completes=(positions + 1) % block_size == 0,
            dense=seqlens <= dense_until,
        )


class GateCache:
    """One layer's gate state for a batch.

    Attributes:
        keys: ``[B, capacity, Hkv, Dg]`` compression cache (gate dtype); entries at or past
            a row's complete-block count hold stale values that nothing reads.
        recent: ``[B, block_size, Hkv, D]`` pre-RoPE keys of each row's current block
            (model dtype); slot ``i`` holds token ``last*bs + i`` once it is seen.
    """

    def __init__(self, keys: torch.Tensor, recent: torch.Tensor) -> None:
        self.keys = _static(keys)
        self.recent = _static(recent)

    @property
    def block_size(self) -> int:
        return self.recent.shape[1]

    def memory_bytes(self) -> int:
        """Bytes held (about ``Dg / (2 * block_size * D)`` of the layer's KV cache)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.recent))

    @classmethod
    def prefill(
        cls,
        gate: AttnGate,
        k_pre: torch.Tensor,
        seqlens: torch.Tensor,
        offsets: torch.Tensor,
        block_size: int,
        capacity: int,
    ) -> GateCache:
        """Build the cache from a prompt.

        Args:
            gate: the layer's gate.
            k_pre: ``[B, S, Hkv, D]`` pre-RoPE keys of the prompt (left-padded rows allowed).
            seqlens: ``[B]`` int32 real tokens per row.
            offsets: ``[B]`` int32 index of each row's first real token in ``k_pre``.
            block_size: tokens per block.
            capacity: compression-cache entries to allocate (``>= ceil(S / bs)``).
        """
        batch, s, hkv, d = k_pre.shape
        pooled = ops.kpool(k_pre, seqlens, block_size, offsets)
        nblk = pooled.shape[1]
        starts = (torch.arange(nblk, device=k_pre.device) * block_size).expand(batch, nblk)
        entries = gate.project_k(pooled, starts)
        keys = entries.new_zeros(batch, max(capacity, nblk), hkv, gate.gate_dim)
        keys[:, :nblk] = entries
        # The partial block's tokens seed the recent buffer (slots past them are filled as
        # decoding reaches them; until then nothing reads them).
        first = offsets.long() + torch.div(seqlens.long(), block_size, rounding_mode="floor") * block_size
        src = (first[:, None] + torch.arange(block_size, device=k_pre.device)).clamp(max=s - 1)
        recent = k_pre.gather(1, src[:, :, None, None].expand(-1, -1, hkv, d))
        return cls(keys, recent)

    def reserve(self, nblk: int) -> None:
        """Grow the compression cache to ``nblk`` entries (a shape decision, no sync)."""
        have = self.keys.shape[1]
        if nblk <= have:
            return
        grown = self.keys.new_zeros(self.keys.shape[0], max(nblk, 2 * have), *self.keys.shape[2:])
        grown[:, :have] = self.keys
        self.keys = _static(grown)

    def append(self, gate: AttnGate, k_new: torch.Tensor, plan: DecodePlan) -> None:
        """Add the current token's pre-RoPE key ``k_new [B, Hkv, D]``; rows whose block it
        completes get that block's entry. No host sync: all rows compute an entry and a
        mask keeps it only where the block completes."""
        rows = torch.arange(k_new.shape[0], device=k_new.device)
        self.recent[rows, plan.slot] = k_new.to(self.recent.dtype)
        full = torch.full_like(plan.seqlens, self.block_size)
        pooled = ops.kpool(self.recent, full, self.block_size)
        start = (plan.last.long() * self.block_size)[:, None]
        entry = gate.project_k(pooled, start)[:, 0]
        idx = plan.last.long()
        old = self.keys[rows, idx]
        self.keys[rows, idx] = torch.where(plan.completes[:, None, None], entry.to(old.dtype), old)
