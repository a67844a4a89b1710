"""The tiny random-weight Qwen3 that gates train on without ``--model`` (local checkpoints
load through :mod:`seerattn_r.loading`)."""

from __future__ import annotations

import torch
from torch import nn


def random_qwen3(seed: int = 0, vocab_size: int = 256, **overrides) -> nn.Module:
    """A small random-weight ``Qwen3ForCausalLM`` (hidden 128, 2 layers, 4 query / 2 KV
    heads, head dim 64, fp32): what ``seerattn-r train`` uses without ``--model``, and
    the tests' model. ``overrides`` go to ``Qwen3Config``."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    settings = dict(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=65536,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(Qwen3Config(**settings)).eval()
