"""Reference block selections to compare the trained gate against (DESIGN.md "Baselines").

Both read the whole (post-RoPE) KV cache at every step: they measure how good a
selection can be (oracle) or is without training (Quest), not how fast.
"""

from seerattn_r.baselines.oracle import oracle_block_scores
from seerattn_r.baselines.quest import quest_block_bounds, quest_block_scores

__all__ = ["oracle_block_scores", "quest_block_bounds", "quest_block_scores"]
