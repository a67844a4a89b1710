"""Tiny random-weight transformers models for the integration tests (CPU, fp32)."""

from __future__ import annotations

import torch

VOCAB = 256


def tiny_model(kind: str = "qwen3", layers: int = 2, seed: int = 0):
    """A random-weight ``*ForCausalLM``: hidden 128 (Qwen2: 256), 4 query / 2 KV heads, head dim 64."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  pad_token_id=0)
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=64, **common)
        cls = transformers.Qwen3ForCausalLM
    elif kind == "qwen2":
        # Qwen2 has no head_dim setting: hidden 256 / 4 heads gives 64.
        cfg = transformers.Qwen2Config(**{**common, "hidden_size": 256})
        cls = transformers.Qwen2ForCausalLM
    elif kind == "llama":
        cfg = transformers.LlamaConfig(head_dim=64, **common)
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if kind == "qwen2":
        # Non-zero q/k biases, so the capture must include them.
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    return model


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` ``[B, max(lengths)]``, rows left-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    s = max(lengths)
    ids = torch.zeros(len(lengths), s, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, s - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, s - n:] = 1
    return ids, mask


def greedy(model, ids, mask, new_tokens: int, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=0, **kwargs)
