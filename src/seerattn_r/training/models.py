"""Models to train gates for: a local checkpoint, or a tiny random-weight Qwen3."""

from __future__ import annotations

from pathlib import Path

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


def load_model(path: str | Path, device: torch.device, gguf_file: str | None = None):
    """``(model, tokenizer)`` from a local transformers folder (or a GGUF file inside it,
    or a path ending in ``.gguf``): bf16 on a GPU, fp32 on CPU. Nothing is downloaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    return model.to(device).eval(), tokenizer
