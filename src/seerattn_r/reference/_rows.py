"""Row addressing shared by the references: token ``t`` of row ``b`` lives at
``cache[b, offsets[b] + t]`` and is valid for ``t < seqlens[b]``."""

from __future__ import annotations

import torch


def gather_rows(
    cache: torch.Tensor, seqlens: torch.Tensor, offsets: torch.Tensor | None, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache [B, S, H, D]`` realigned so that index ``t`` is each row's token ``t``.

    Returns ``(rows [B, length, H, D] float32, valid [B, length] bool)``.
    """
    batch, smax = cache.shape[:2]
    t = torch.arange(length, device=cache.device)
    off = torch.zeros(batch, dtype=torch.long, device=cache.device)
    if offsets is not None:
        off = offsets.long()
    src = off[:, None] + t[None, :]
    valid = (t[None, :] < seqlens.long()[:, None]) & (src < smax)
    src = src.clamp(max=smax - 1)
    rows = cache.float().gather(1, src[:, :, None, None].expand(-1, -1, *cache.shape[2:]))
    return rows, valid
