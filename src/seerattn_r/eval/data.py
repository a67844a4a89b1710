"""Evaluation text from ``champ-dataset`` (PyPI ``champ-dataset==1.0.0``, MIT), split by problem.

``champ_dataset/dataset_files/v0.json`` holds 270 competition math problems, each with 72
conversations in which a model (GPT-3.5, GPT-4, GPT-4 Turbo, PaLM 2) reasons through it
step by step. One problem becomes one long document: its conversations rendered with the
model's chat template, one after another (the same problem restated and re-solved, which
is real long-range context). The few-shot conversations are left out, because their
prompts quote *other* problems' solutions, which would leak held-out problems into
training.

:func:`prepare_champ` splits the problems into train and held-out with a seeded shuffle
**before** anything else reads the text, writes the split to ``split.json``, then
``train.jsonl`` (one ``{"problem", "text"}`` document per training problem, the format
``seerattn-r train --data`` reads) and ``heldout.json`` (one sequence of exactly
``seq_len`` token ids per held-out problem: the start of its document).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

SPLIT_FILE = "split.json"
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.json"
CHAMP_JSON = ("champ_dataset", "dataset_files", "v0.json")
# Conversations whose prompts quote other problems' worked solutions.
_LEAKING_PROMPTS = ("5-Shot",)
_ROLES = {"System": "system", "User": "user", "Imputation": "assistant"}


def champ_path() -> Path:
    """The installed ``champ_dataset/dataset_files/v0.json``.

    Raises:
        ImportError: the package is not installed (says what to pip install).
    """
    spec = importlib.util.find_spec(CHAMP_JSON[0])
    if spec is None or spec.origin is None:
        raise ImportError("the champ data set is not installed: pip install --no-deps champ-dataset==1.0.0")
    path = Path(spec.origin).parent.joinpath(*CHAMP_JSON[1:])
    if not path.is_file():
        raise FileNotFoundError(f"champ-dataset is installed but {path} is missing")
    return path


def load_problems(path: str | Path | None = None) -> dict[str, dict]:
    """``{problem id: record}`` of ``v0.json`` (default: the installed package's)."""
    with open(path if path is not None else champ_path(), encoding="utf-8") as f:
        return json.load(f)["problems"]


def split_problems(ids: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` problem ids: a seeded shuffle of the sorted ids, the first
    ``round(len * heldout_fraction)`` (at least 1) held out. Both lists come back sorted."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must lie in (0, 1), got {heldout_fraction}")
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    n = max(1, round(len(order) * heldout_fraction))
    if n >= len(order):
        raise ValueError(f"heldout_fraction={heldout_fraction} leaves no training problem of {len(order)}")
    return sorted(order[n:]), sorted(order[:n])


def _messages(conversation: dict) -> list[dict]:
    out = []
    for m in conversation["messages"]:
        if m.get("text") is None:  # a turn lost to the source model's length limit
            continue
        role = "assistant" if m["role"].startswith("Model.") else _ROLES[m["role"]]
        out.append({"role": role, "content": m["text"]})
    return out


def render_problem(problem: dict, tokenizer, max_chars: int | None = None) -> str:
    """One problem's document: its conversations (few-shot ones excepted), in the data
    set's order, each through ``tokenizer``'s chat template (plain ``role: text`` lines
    when it has none). Stops after ``max_chars`` characters when given (whole
    conversations; at least one)."""
    parts, size = [], 0
    for name, conv in problem["conversations"].items():
        if any(tag in name for tag in _LEAKING_PROMPTS):
            continue
        messages = _messages(conv)
        if not messages:
            continue
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        parts.append(text)
        size += len(text)
        if max_chars is not None and size >= max_chars:
            break
    return "".join(parts)


def _encode(tokenizer, text: str) -> list[int]:
    # transformers tokenizers are callables; the random model's ByteTokenizer only encodes.
    if callable(tokenizer):
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.encode(text)


def _prefix_ids(text: str, tokenizer, length: int) -> list[int] | None:
    # Tokenizing a whole 80k-token document to keep its first 8k is wasteful: grow a
    # character prefix until it holds `length` tokens (+1 so the cut is not mid-merge).
    chars = 8 * length
    while True:
        ids = _encode(tokenizer, text[:chars])
        if len(ids) > length or chars >= len(text):
            return ids[:length] if len(ids) >= length else None
        chars *= 2


def prepare_champ(
    out_dir: str | Path,
    tokenizer,
    seq_len: int = 8192,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    max_train_chars: int | None = None,
    problems: dict[str, dict] | None = None,
) -> dict:
    """Write ``split.json``, ``train.jsonl`` and ``heldout.json`` into ``out_dir``.

    Args:
        out_dir: created if needed.
        tokenizer: the model's tokenizer (chat template and held-out token ids).
        seq_len: tokens per held-out sequence; problems whose document is shorter are
            left out of ``heldout.json`` (never moved to train).
        heldout_fraction: share of problems held out.
        seed: the split's seed.
        max_train_chars: cap on each training document's characters (bounds the data a
            short training run carries and tokenizes); None keeps whole documents.
        problems: the records (default: the installed ``v0.json``).

    Returns:
        the ``split.json`` content: ``{"seed", "heldout_fraction", "train", "heldout"}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    problems = load_problems() if problems is None else problems
    train, heldout = split_problems(list(problems), heldout_fraction, seed)
    split = {"source": "champ-dataset==1.0.0 v0.json", "seed": seed,
             "heldout_fraction": heldout_fraction, "train": train, "heldout": heldout}
    (out / SPLIT_FILE).write_text(json.dumps(split, indent=1) + "\n")

    with open(out / TRAIN_FILE, "w", encoding="utf-8") as f:
        for pid in train:
            text = render_problem(problems[pid], tokenizer, max_train_chars)
            f.write(json.dumps({"problem": pid, "text": text}) + "\n")

    sequences = []
    for pid in heldout:
        ids = _prefix_ids(render_problem(problems[pid], tokenizer), tokenizer, seq_len)
        if ids is not None:
            sequences.append({"problem": pid, "input_ids": ids})
    # The tokenizer's name, never its local path (the file may be shared or committed).
    name = Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name
    held = {"seq_len": seq_len, "tokenizer": name,
            "sequences": sequences}
    (out / HELDOUT_FILE).write_text(json.dumps(held) + "\n")
    return split


def load_heldout(data_dir: str | Path, split_check: bool = True) -> dict:
    """``heldout.json`` of a prepared folder; with ``split_check`` also verify against
    ``split.json`` that no sequence comes from a training problem."""
    root = Path(data_dir)
    held = json.loads((root / HELDOUT_FILE).read_text())
    if split_check:
        split = json.loads((root / SPLIT_FILE).read_text())
        train = set(split["train"])
        leaked = [s["problem"] for s in held["sequences"] if s["problem"] in train]
        if leaked:
            raise ValueError(f"held-out sequences from training problems: {leaked[:5]}")
    return held
