"""Local training text: loading, tokenising, and packing into fixed-length rows.

Formats (nothing is downloaded):

* ``.txt``: the whole file is one document.
* ``.jsonl``: one JSON object per line with a ``text`` string or a ``messages`` list of
  ``{"role", "content"}`` (rendered with the tokenizer's chat template, so reasoning
  traces keep their ``<think>`` content).
* ``.parquet``: the same ``text``/``messages`` columns; needs ``pandas`` or ``pyarrow``.

Packing concatenates the (shuffled) documents and cuts the stream into rows of exactly
``seq_len`` tokens; ``cu_seqlens`` marks the document boundaries inside a row, and a
document crossing a row boundary continues in the next row as a new sequence (positions
restart). No padding, so every row costs the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMATS = (".txt", ".jsonl", ".parquet")


def _parquet_records(path: Path) -> list[dict]:
    try:
        import pandas as pd
    except ImportError:
        pd = None
    if pd is not None:
        return pd.read_parquet(path).to_dict("records")
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            f"reading {path} needs pandas or pyarrow: `pip install pyarrow` (or pandas), "
            "or convert the data to .jsonl"
        ) from exc
    return pq.read_table(path).to_pylist()


def _document(record: object, where: str) -> str | list[dict]:
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        messages = record.get("messages")
        if messages is not None and not isinstance(messages, str):
            return [dict(m) for m in messages]
    raise ValueError(f"{where}: expected an object with a 'text' string or a 'messages' list")


def load_documents(path: str | Path) -> list[str | list[dict]]:
    """Documents of a ``.txt``, ``.jsonl`` or ``.parquet`` file: plain strings, or message
    lists (``[{"role": ..., "content": ...}, ...]``) for chat-formatted records."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training data {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    docs.append(_document(json.loads(line), f"{path}:{i}"))
        return docs
    if suffix == ".parquet":
        return [_document(r, f"{path} row {i}") for i, r in enumerate(_parquet_records(path))]
    raise ValueError(f"unrecognised data format {path.name!r}: use one of {', '.join(FORMATS)}")


class ByteTokenizer:
    """UTF-8 bytes as token ids (mod ``vocab_size``): the stand-in tokenizer of the
    random-weight model that ``seerattn-r train`` builds when no ``--model`` is given."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, doc: str | list[dict]) -> list[int]:
        if not isinstance(doc, str):
            doc = "\n".join(f"{m['role']}: {m['content']}" for m in doc)
        return [b % self.vocab_size for b in doc.encode("utf-8")]


def tokenize(docs: list[str | list[dict]], tokenizer) -> list[np.ndarray]:
    """Token ids (int32) of each document; message lists go through the chat template."""
    out = []
    for doc in docs:
        if isinstance(tokenizer, ByteTokenizer):
            ids = tokenizer.encode(doc)
        elif isinstance(doc, str):
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        else:
            text = tokenizer.apply_chat_template(doc, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(np.asarray(ids, dtype=np.int32))
    return out


def split_documents(docs: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out) split by document, before any packing, fixed by ``seed``."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_eval = int(round(len(docs) * eval_fraction))
    if eval_fraction > 0 and len(docs) > 1:
        n_eval = max(n_eval, 1)
    held = [docs[i] for i in sorted(order[:n_eval])]
    train = [docs[i] for i in sorted(order[n_eval:])]
    return train, held


@dataclass
class PackedRow:
    """One training row: ``input_ids [seq_len]`` int64, ``position_ids [seq_len]`` int64
    (restarting at 0 for each document), ``cu_seqlens`` the document boundaries
    (``0 = c_0 < c_1 < ... < c_N = seq_len``)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: list[int]


class PackedDataset:
    """Rows of exactly ``seq_len`` tokens, reproducible by index.

    Epoch ``e`` shuffles the documents with ``seed + e`` and packs them; row ``i`` is row
    ``i % rows_per_epoch`` of epoch ``i // rows_per_epoch``. The row sequence is a pure
    function of (documents, seq_len, seed), which is what makes ``--resume`` exact.
    """

    def __init__(self, docs: list[np.ndarray], seq_len: int, seed: int = 0) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.docs = [d for d in docs if len(d) > 0]
        self.seq_len = seq_len
        self.seed = seed
        total = sum(len(d) for d in self.docs)
        self.rows_per_epoch = total // seq_len
        if self.rows_per_epoch == 0:
            raise ValueError(f"the data holds {total} tokens, fewer than one row of seq_len={seq_len}")
        self._epoch: int | None = None

    def _pack(self, epoch: int) -> None:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.docs))
        docs = [self.docs[i] for i in order]
        self._tokens = np.concatenate(docs)
        self._starts = np.cumsum([0] + [len(d) for d in docs])
        self._epoch = epoch

    def __getitem__(self, index: int) -> PackedRow:
        epoch, row = divmod(index, self.rows_per_epoch)
        if self._epoch != epoch:
            self._pack(epoch)
        lo, hi = row * self.seq_len, (row + 1) * self.seq_len
        inner = self._starts[(self._starts > lo) & (self._starts < hi)] - lo
        cu = [0, *inner.tolist(), self.seq_len]
        positions = np.concatenate([np.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
        return PackedRow(
            input_ids=torch.from_numpy(self._tokens[lo:hi].astype(np.int64)),
            position_ids=torch.from_numpy(positions.astype(np.int64)),
            cu_seqlens=cu,
        )
