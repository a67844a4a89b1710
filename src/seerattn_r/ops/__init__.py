"""The public ops. Each is a ``torch.library`` custom op in namespace ``seerattn``
(``torch.ops.seerattn.<name>``) with a fake implementation, so ``torch.compile`` traces
through it with no graph break; the functions here are their typed, documented wrappers.
Which kernel runs is decided per call by :mod:`seerattn_r.backend`.
"""

from seerattn_r.ops.attn_block_max import attn_block_max
from seerattn_r.ops.gate_cache import gate_cache_append, gate_keys
from seerattn_r.ops.gate_project_q import gate_project_q
from seerattn_r.ops.gate_scores import gate_scores
from seerattn_r.ops.gate_select import gate_select
from seerattn_r.ops.kpool import kpool
from seerattn_r.ops.select_blocks import num_selected_slots, select_blocks
from seerattn_r.ops.sparse_decode import sparse_decode

__all__ = ["attn_block_max", "gate_cache_append", "gate_keys", "gate_project_q", "gate_scores", "gate_select", "kpool",
           "num_selected_slots", "select_blocks", "sparse_decode"]
