"""Pure-PyTorch implementations of every op, accumulating in fp32.

They are the definition of "correct" that every kernel is tested against, and they run on
any device (the ``torch`` backend). Written for clarity, not speed.
"""

from seerattn_r.reference.gate_scores import gate_scores
from seerattn_r.reference.kpool import kpool
from seerattn_r.reference.select_blocks import select_blocks
from seerattn_r.reference.sparse_decode import sparse_decode

__all__ = ["gate_scores", "kpool", "select_blocks", "sparse_decode"]
