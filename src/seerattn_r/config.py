"""``SparseDecodeConfig``: how a patched model decodes (see :func:`seerattn_r.patch_model`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BLOCK_SIZES = (16, 32, 64, 128)
SELECTIONS = ("gate", "oracle", "quest")

# Quest keeps at least this many blocks per head (the Quest paper's minimum page count).
QUEST_MIN_BLOCKS = 3


@dataclass(frozen=True)
class SparseDecodeConfig:
    """Sparse-decoding settings of a patched model.

    Attributes:
        block_size: tokens per KV block (16, 32, 64 or 128); must match the gates'
            ``seerattn_gate_block_size`` when gates are loaded.
        token_budget: keep the top ``token_budget // block_size`` blocks per KV head (per
            query head for Quest) at each decode step. Exactly one of ``token_budget`` and
            ``threshold`` is set.
        threshold: or keep the blocks whose gate probability is ``> threshold`` (typical
            2e-3 to 6e-3; gate selection only).
        sink_block: always read block 0 (the attention sink). The block holding the current
            token is always read.
        dense_layers: layer indices that keep dense attention at decode; their gates still
            update their compression caches, so a layer can be switched later.
        min_sparse_length: a row decodes densely while its length (tokens in the cache,
            the current one included) is ``<= min_sparse_length``. ``None`` means
            ``token_budget`` (0 with a threshold). Decided per row on the device.
        selection: ``"gate"`` (the trained AttnGate), ``"oracle"`` (true block-max
            attention, an accuracy upper bound that reads the whole cache) or ``"quest"``
            (per-query-head min/max key bound, training-free; needs ``token_budget``).
        backend: ``"torch"``, ``"triton"``, ``"tilelang"``, ``"auto"`` or ``None`` (follow
            ``SEERATTN_BACKEND``). Applied around eager decode steps; inside
            ``torch.compile`` the backend in force when the compiled step runs is used
            (wrap the call in :func:`seerattn_r.use_backend` or set the variable).
        gate_dim: the gates' hidden size ``Dg`` when ``patch_model`` builds fresh gates.
        collect_stats: accumulate per-layer block statistics on the device (read them with
            :func:`seerattn_r.integrations.sparsity_stats`).
    """

    block_size: int = 64
    token_budget: int | None = None
    threshold: float | None = None
    sink_block: bool = True
    dense_layers: tuple[int, ...] = field(default_factory=tuple)
    min_sparse_length: int | None = None
    selection: str = "gate"
    backend: str | None = None
    gate_dim: int = 128
    collect_stats: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        if (self.token_budget is None) == (self.threshold is None):
            raise ValueError(
                "set exactly one of token_budget and threshold, got "
                f"token_budget={self.token_budget!r}, threshold={self.threshold!r}"
            )
        if self.token_budget is not None and (
            not isinstance(self.token_budget, int) or self.token_budget < 0
        ):
            raise ValueError(f"token_budget must be a non-negative int, got {self.token_budget!r}")
        if self.threshold is not None and not 0.0 <= float(self.threshold) < 1.0:
            raise ValueError(f"threshold must lie in [0, 1), got {self.threshold!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.selection == "quest" and self.token_budget is None:
            raise ValueError("selection='quest' ranks unnormalised bounds: it needs token_budget, not threshold")
        if self.min_sparse_length is not None and (
            not isinstance(self.min_sparse_length, int) or self.min_sparse_length < 0
        ):
            raise ValueError(f"min_sparse_length must be a non-negative int, got {self.min_sparse_length!r}")
        if not isinstance(self.gate_dim, int) or self.gate_dim <= 0 or self.gate_dim % 2:
            raise ValueError(f"gate_dim must be a positive even int (RoPE pairs), got {self.gate_dim!r}")
        object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))

    @property
    def dense_until(self) -> int:
        """The resolved ``min_sparse_length``."""
        if self.min_sparse_length is not None:
            return self.min_sparse_length
        return self.token_budget if self.token_budget is not None else 0

    @property
    def dense_blocks(self) -> int:
        """Blocks a row below ``dense_until`` reads: all of them."""
        return math.ceil(self.dense_until / self.block_size)

    @property
    def selection_budget(self) -> int | None:
        """The token budget passed to block selection (Quest keeps at least 3 blocks)."""
        if self.token_budget is None or self.selection != "quest":
            return self.token_budget
        return max(self.token_budget, QUEST_MIN_BLOCKS * self.block_size)
