"""The K compression cache and the pre-RoPE recent-K buffer of one layer, and the decode
plan shared by all layers of a step.

Row addressing follows the ops: row ``b``'s token ``t`` (``t = 0`` its first real token)
sits at KV-cache index ``offsets[b] + t`` and has position ``t``; its block ``j`` holds
tokens ``j*bs .. j*bs+bs-1``. Entry ``j`` of the compression cache is the gate key of
block ``j`` (pooled pre-RoPE keys, projected, normed, RoPE'd at position ``j*bs``); it is
written once, when the block completes, and never recomputed. Everything here runs on
the device without a host sync: which rows complete a block this step is a mask.

On a GPU under ``torch.no_grad`` (see :func:`seerattn_r.gate.use_fused`) the prompt's
entries come from one ``ops.gate_keys`` kernel and each decode step is one
``ops.gate_cache_append`` kernel; both share their pooling and projection code, so the
prefill/decode invariant holds bit for bit there too. Elsewhere the torch code runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seerattn_r import ops
from seerattn_r.gate import RMS_EPS, AttnGate, use_fused


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


def _key_params(gate: AttnGate) -> tuple:
    """The key branch's parameters in the order the cache ops take them."""
    return (gate.attngate_linear_k.weight, gate.attngate_knorm.weight, gate.rope.inv_freq,
            gate.rope.attention_scaling, RMS_EPS)


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
        fused: bool | None = None,
    ) -> GateCache:
        """Build the cache from a prompt.

        Args:
            gate: the layer's gate.
            k_pre: ``[B, S, Hkv, D]`` pre-RoPE keys of the prompt (left-padded rows allowed).
            seqlens: ``[B]`` int32 real tokens per row.
            offsets: ``[B]`` int32 index of each row's first real token in ``k_pre``.
            block_size: tokens per block.
            capacity: compression-cache entries to allocate (``>= ceil(S / bs)``).
            fused: compute the entries with ``ops.gate_keys`` (one kernel) instead of
                ``ops.kpool`` + ``gate.project_k``; default :func:`~seerattn_r.gate.use_fused`.
                Use the same choice as :meth:`append` for bit-identical entries.
        """
        batch, s, hkv, d = k_pre.shape
        if use_fused(fused, k_pre):
            entries = ops.gate_keys(k_pre, seqlens, block_size, *_key_params(gate), cache_offsets=offsets)
        else:
            pooled = ops.kpool(k_pre, seqlens, block_size, offsets)
            starts = (torch.arange(pooled.shape[1], device=k_pre.device) * block_size).expand(batch, -1)
            entries = gate.project_k(pooled, starts)
        nblk = entries.shape[1]
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

    def append(self, gate: AttnGate, k_new: torch.Tensor, plan: DecodePlan, fused: bool | None = None) -> None:
        """Add the current token's pre-RoPE key ``k_new [B, Hkv, D]``; rows whose block it
        completes get that block's entry. No host sync.

        Fused (default :func:`~seerattn_r.gate.use_fused`): one ``ops.gate_cache_append``
        kernel that only writes the key in rows that do not complete a block. Torch path:
        all rows compute an entry and a mask keeps it only where the block completes.
        """
        if use_fused(fused, k_new):
            ops.gate_cache_append(k_new.to(self.recent.dtype), self.recent, self.keys, plan.positions,
                                  *_key_params(gate))
            return
        rows = torch.arange(k_new.shape[0], device=k_new.device)
        self.recent[rows, plan.slot] = k_new.to(self.recent.dtype)
        full = torch.full_like(plan.seqlens, self.block_size)
        pooled = ops.kpool(self.recent, full, self.block_size)
        start = (plan.last.long() * self.block_size)[:, None]
        entry = gate.project_k(pooled, start)[:, 0]
        idx = plan.last.long()
        old = self.keys[rows, idx]
        self.keys[rows, idx] = torch.where(plan.completes[:, None, None], entry.to(old.dtype), old)
