"""Model integrations: patch a transformers decoder for SeerAttention-R sparse decoding.

>>> model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
>>> patch_model(model, SparseDecodeConfig(token_budget=4096), gates="path/to/gates")
>>> out = model.generate(**inputs, max_new_tokens=1024)
>>> sparsity_stats(model)["sparsity"]
"""

from seerattn_r.integrations.hf import SUPPORTED, patch_model, sparsity_stats, unpatch_model

__all__ = ["SUPPORTED", "patch_model", "sparsity_stats", "unpatch_model"]
