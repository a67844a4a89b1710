"""Loading a causal LM for the command line (``generate``, ``train``, ``eval``), offline.

Three sources:

* a transformers folder (``config.json``, weights, tokenizer files);
* a GGUF file: ``load_model(folder, gguf_file="name.gguf")`` or a path ending in
  ``.gguf``. transformers de-quantizes it into plain ``nn.Linear`` weights (it needs the
  ``gguf`` and ``accelerate`` packages); SmolLM2-135M's Q4_1 file takes about 25 s on an
  idle CPU;
* ``None``: the small random-weight Qwen3 of :func:`seerattn_r.training.models.random_qwen3`
  with a byte tokenizer, so every command runs anywhere.

Nothing is ever downloaded (``local_files_only=True``): a missing path is an error.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU, fp32 on CPU (CPU bf16 matmuls are slow and the tests compare in fp32)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_model_path(path: str | Path, gguf_file: str | None = None) -> tuple[Path, str | None]:
    """``(folder, gguf_file)`` for ``from_pretrained``.

    Args:
        path: a transformers folder, a folder holding ``gguf_file``, or a ``.gguf`` file.
        gguf_file: the GGUF file's name inside ``path`` (or None).

    Raises:
        FileNotFoundError: the folder or the GGUF file does not exist.
        ValueError: ``gguf_file`` is given together with a ``.gguf`` path.
    """
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        if gguf_file is not None:
            raise ValueError(
                f"model path {str(path)!r} is already a .gguf file; pass gguf_file only with a folder"
            )
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (models are never downloaded)")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file!r} not found in {str(path)!r}")
    if gguf_file is None and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{str(path)!r} has no config.json: pass a transformers model folder, or a GGUF file "
            "(a path ending in .gguf, or --gguf-file NAME)"
        )
    return path, gguf_file


def _gguf_kwargs(gguf_file: str | None) -> dict:
    if gguf_file is None:
        return {}
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"loading the GGUF model {gguf_file!r} needs {' and '.join(missing)}: "
            f"pip install {' '.join(missing)}"
        )
    return {"gguf_file": gguf_file}


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    """The tokenizer alone (much faster than :func:`load_model` for a GGUF file)."""
    from transformers import AutoTokenizer

    folder, gguf_file = resolve_model_path(path, gguf_file)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True, **_gguf_kwargs(gguf_file))


def load_model(
    path: str | Path | None,
    gguf_file: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
):
    """``(model, tokenizer)``, the model in eval mode on ``device``.

    Args:
        path: see the module docstring; None builds the random-weight Qwen3 (its tokenizer
            is :class:`seerattn_r.training.data.ByteTokenizer`).
        gguf_file: a GGUF file name inside the folder ``path``.
        dtype: the model's dtype; default :func:`default_dtype` of the device.
        device: default CUDA when available, else CPU.

    Raises:
        FileNotFoundError: missing folder or file.
        ImportError: a GGUF model without the ``gguf`` (or ``accelerate``) package; the
            message says what to pip install.
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype if dtype is not None else default_dtype(device)
    if path is None:
        from seerattn_r.training.data import ByteTokenizer
        from seerattn_r.training.models import random_qwen3

        model = random_qwen3()
        return model.to(device=device, dtype=dtype).eval(), ByteTokenizer(model.config.vocab_size)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = resolve_model_path(path, gguf_file)
    extra = _gguf_kwargs(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    return model.to(device).eval(), tokenizer
