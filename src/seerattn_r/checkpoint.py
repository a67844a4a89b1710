"""Gate checkpoints: our format and the published SeerAttention-R AttnGates layout.

A gate directory holds ``config.json`` (``seerattn_gate_block_size``,
``seerattn_gate_hidden_size``, ``seerattn_k_seq_pooling_type`` = ``"Kmaxminavg"``,
``seerattn_q_head_pooling_type`` = ``"Qproj"``, ``seerattn_use_qk_norm``,
``seerattn_use_rope``, ``base_model``) and the weights, keyed per layer ``i`` as
``model.layers.{i}.self_attn.attn_gate.attngate_linear_q.weight [Hkv, g, D, Dg]``,
``...attngate_linear_k.weight [Hkv, 3D, Dg]``, ``...attngate_qnorm.weight [Dg]``,
``...attngate_knorm.weight [Dg]``: ours in ``attn_gate_weights.safetensors``, the
published ones in ``attn_gate_weights.pth`` (a ``torch.save`` dict, bf16).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "attn_gate_weights.safetensors"
PTH_FILE = "attn_gate_weights.pth"
KEY_FORMAT = "model.layers.{layer}.self_attn.attn_gate.{param}"
PARAMS = ("attngate_linear_q.weight", "attngate_linear_k.weight", "attngate_qnorm.weight", "attngate_knorm.weight")
FIXED_CONFIG = {
    "seerattn_k_seq_pooling_type": "Kmaxminavg",
    "seerattn_q_head_pooling_type": "Qproj",
    "seerattn_use_qk_norm": True,
    "seerattn_use_rope": True,
}
_KEY_RE = re.compile(r"^(?:.*\.)?layers\.(\d+)\.self_attn\.attn_gate\.(.+)$")
_SHORT_KEY_RE = re.compile(r"^(\d+)\.(attngate_.+)$")


def gate_key(layer: int, param: str) -> str:
    """The checkpoint key of ``param`` (e.g. ``"attngate_qnorm.weight"``) of ``layer``."""
    return KEY_FORMAT.format(layer=layer, param=param)


def canonical_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gate tensors re-keyed to the checkpoint layout.

    Accepts the checkpoint keys themselves, a patched model's ``state_dict()`` (its
    non-gate entries are dropped) or an ``nn.ModuleList`` of gates' (``"3.attngate_qnorm.weight"``).
    """
    out = {}
    for key, value in state_dict.items():
        m = _KEY_RE.match(key) or _SHORT_KEY_RE.match(key)
        if m is None or m.group(2) not in PARAMS:
            continue
        out[gate_key(int(m.group(1)), m.group(2))] = value
    if not out:
        raise ValueError(
            "state_dict holds no gate tensor: expected keys like "
            f"{gate_key(0, PARAMS[0])!r} or '0.{PARAMS[0]}'"
        )
    return out


def _check_config(config: dict, where: str) -> None:
    for key, want in FIXED_CONFIG.items():
        if key in config and config[key] != want:
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported (only {want!r})")
    for key in ("seerattn_gate_block_size", "seerattn_gate_hidden_size"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"{where}: {key} must be an int, got {config.get(key)!r}")


def save_gates(state_dict: dict[str, torch.Tensor], config: dict, out_dir: str | os.PathLike) -> Path:
    """Write gates in our format.

    Args:
        state_dict: gate tensors (any key form :func:`canonical_state_dict` accepts).
        config: at least ``seerattn_gate_block_size``; ``seerattn_gate_hidden_size`` is
            taken from the tensors when missing, ``base_model`` defaults to ``""``; the
            fixed keys (pooling types, qk norm, rope) are filled in.
        out_dir: created if needed.

    Returns:
        ``out_dir`` as a Path.
    """
    from safetensors.torch import save_file

    tensors = canonical_state_dict(state_dict)
    dg = tensors[next(k for k in tensors if k.endswith("attngate_qnorm.weight"))].shape[-1]
    full = {**FIXED_CONFIG, "seerattn_gate_hidden_size": int(dg), "base_model": "", **config}
    _check_config(full, "config")
    if full["seerattn_gate_hidden_size"] != dg:
        raise ValueError(
            f"config seerattn_gate_hidden_size={full['seerattn_gate_hidden_size']} but the gates' "
            f"attngate_qnorm.weight has {dg} channels"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / SAFETENSORS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    return out


def load_gates(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a gate directory, ours (safetensors) or the published layout (``.pth``).

    Returns:
        ``(state_dict, config)``: tensors on CPU in their stored dtype, keyed as
        :data:`KEY_FORMAT`; ``config`` the ``config.json`` dict.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"gate directory {str(root)!r} does not exist")
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{str(root)!r} has no {CONFIG_FILE}")
    config = json.loads(cfg_path.read_text())
    _check_config(config, str(cfg_path))
    if (root / SAFETENSORS_FILE).is_file():
        from safetensors.torch import load_file

        raw = load_file(str(root / SAFETENSORS_FILE))
    elif (root / PTH_FILE).is_file():
        raw = torch.load(root / PTH_FILE, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{str(root)!r} has neither {SAFETENSORS_FILE} nor {PTH_FILE}")
    return canonical_state_dict(raw), config


def expected_shapes(num_layers: int, num_kv_heads: int, group: int, head_dim: int,
                    gate_dim: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape for a model's gates."""
    per_layer = {
        "attngate_linear_q.weight": (num_kv_heads, group, head_dim, gate_dim),
        "attngate_linear_k.weight": (num_kv_heads, 3 * head_dim, gate_dim),
        "attngate_qnorm.weight": (gate_dim,),
        "attngate_knorm.weight": (gate_dim,),
    }
    return {gate_key(i, p): s for i in range(num_layers) for p, s in per_layer.items()}


def check_gates(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], model_name: str) -> None:
    """Raise ``ValueError`` naming the tensor and both shapes where ``state_dict`` does not
    fit ``expected`` (from :func:`expected_shapes`), or the missing/extra keys."""
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise ValueError(
            f"gates have no tensor {missing[0]!r} (needed by {model_name}, shape "
            f"{tuple(expected[missing[0]])}); {len(missing)} tensors missing in all"
        )
    extra = sorted(k for k in state_dict if k not in expected)
    if extra:
        raise ValueError(
            f"gates hold {extra[0]!r} (shape {tuple(state_dict[extra[0]].shape)}), which {model_name} "
            f"has no place for: gates for another model ({len(extra)} extra tensors)"
        )
    for key, shape in expected.items():
        got = tuple(state_dict[key].shape)
        if got != tuple(shape):
            raise ValueError(
                f"gate tensor {key!r} has shape {got} but {model_name} needs {tuple(shape)} "
                "(gates for another model?)"
            )
