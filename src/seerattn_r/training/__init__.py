"""Gate training by self-distillation: the frozen model's block-max attention
(``seerattn_r.ops.attn_block_max``) is the target of each layer's AttnGate.

``seerattn-r train`` / ``seerattn-r eval-gates`` (:mod:`seerattn_r.training.cli`) drive
:class:`~seerattn_r.training.trainer.GateTrainer` and
:func:`~seerattn_r.training.evaluate.evaluate_gates`.
"""
