"""Self-distillation of AttnGates from a frozen model (DESIGN.md "Training").

Per packed row and per layer: the teacher (:mod:`seerattn_r.training.teacher`) runs the
layer's attention through ``attn_block_max``, the layer's gate scores every position of
the row's sequences, the KL to the target on the last ``loss_slice_ratio`` of positions
is backpropagated into that gate at once, and the target is dropped before the next layer
runs. The loss of a row is the sum over layers of the per-layer mean KL, times
``loss_scale``. Only gate parameters are optimised; the base model runs under
``torch.no_grad`` with ``requires_grad`` off and never enters the optimizer, so its
weights stay bit-identical.

Memory per 32k-token row, Qwen3-4B shape (36 layers, 32/8 heads, D 128, bf16 weights,
block 64, Dg 128): one layer's target ``[8, 32768, 512]`` fp32 is 0.5 GiB; the gate's
logits, log-softmax and KL terms over the 16k loss positions ``[8, 16384, 511]`` fp32 are
about 0.27 GiB each (about 1.5 GiB with their autograd buffers); the frozen model's
no-grad activations of one layer (hidden 2560, MLP 9728) are under 1 GiB; weights 8 GB.
Measured on an H100 (``python -m seerattn_r.training.bench``, random weights, one 32k
row per step): peak 11.9 GiB allocated, of which 7.5 GiB are the weights; 14.2k tokens/s.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from seerattn_r.training.data import PackedDataset, PackedRow
from seerattn_r.training.loss import layer_kl
from seerattn_r.training.teacher import LayerTensors, teacher_attention

CHECKPOINT = "train_state.pt"


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults are the published recipe (800 steps x 16 x 32k tokens).

    ``steps`` counts optimizer steps; each takes ``grad_accum`` packed rows of ``seq_len``
    tokens. The learning rate warms up linearly over ``warmup_steps`` and then follows a
    cosine from ``lr`` to ``min_lr`` at ``steps``.
    """

    block_size: int = 64
    gate_dim: int = 128
    steps: int = 800
    seq_len: int = 32768
    grad_accum: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    loss_scale: float = 10.0
    loss_slice_ratio: float = 0.5
    seed: int = 0
    save_every: int = 100
    bf16_autocast: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.loss_slice_ratio <= 1.0:
            raise ValueError(f"loss_slice_ratio must lie in (0, 1], got {self.loss_slice_ratio}")
        if self.seq_len <= self.block_size:
            raise ValueError(f"seq_len={self.seq_len} must exceed block_size={self.block_size}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(self.steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass
class StepResult:
    step: int
    loss: float
    layer_kl: list[float]
    lr: float
    tokens_per_s: float


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def row_layer_kl(
    model: nn.Module,
    gates: nn.ModuleList,
    row: PackedRow,
    block_size: int,
    loss_slice_ratio: float,
    backward_scale: float | None = None,
    autocast: bool = True,
    on_layer: Callable[[LayerTensors], None] | None = None,
) -> torch.Tensor:
    """Run the teacher on one packed row; return the per-layer mean KL ``[L]`` fp32.

    With ``backward_scale``, each layer's mean KL times ``backward_scale`` is
    backpropagated into its gate as soon as the layer's target exists (gradients
    accumulate in ``.grad``). ``on_layer`` sees every layer's tensors after that (eval).
    """
    device = next(gates.parameters()).device
    cu = torch.tensor(row.cu_seqlens, dtype=torch.int32, device=device)
    max_seqlen = max(b - a for a, b in zip(row.cu_seqlens[:-1], row.cu_seqlens[1:]))
    kls = torch.zeros(len(gates), device=device)

    def layer(t: LayerTensors) -> None:
        with torch.enable_grad(), _autocast(device, autocast):
            total, count = layer_kl(gates[t.layer_idx], t.q_pre, t.k_pre, t.target, row.cu_seqlens,
                                    block_size, loss_slice_ratio)
            if count:
                mean = total / count
                if backward_scale is not None:
                    (mean * backward_scale).backward()
                kls[t.layer_idx] = mean.detach()
        if on_layer is not None:
            on_layer(t)

    with torch.no_grad(), teacher_attention(model, block_size, cu, max_seqlen, layer):
        model.base_model(
            input_ids=row.input_ids[None].to(device),
            position_ids=row.position_ids[None].to(device),
            use_cache=False,
        )
    return kls


class GateTrainer:
    """Trains ``gates`` (one :class:`~seerattn_r.gate.AttnGate` per layer, fp32) against
    ``model`` (frozen) on ``data``.

    Args:
        model: a transformers causal LM on its device (any dtype).
        gates: ``nn.ModuleList`` of the model's gates (``seerattn_r.gate.build_gates``);
            moved to the model's device in fp32 (master weights; bf16 autocast on GPU).
        data: packed rows; optimizer step ``s`` uses rows ``s * grad_accum ..``.
        config: :class:`TrainConfig`.
    """

    def __init__(self, model: nn.Module, gates: nn.ModuleList, data: PackedDataset, config: TrainConfig) -> None:
        if len(gates) != len(model.base_model.layers):
            raise ValueError(f"need one gate per layer: {len(model.base_model.layers)} layers, {len(gates)} gates")
        if data.seq_len != config.seq_len:
            raise ValueError(f"data rows hold {data.seq_len} tokens but config.seq_len is {config.seq_len}")
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.gates = gates.to(device=self.device, dtype=torch.float32).train()
        self.data = data
        self.config = config
        self.optimizer = torch.optim.AdamW(
            self.gates.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        self.step = 0
        self.history: list[dict] = []

    def train_step(self) -> StepResult:
        """One optimizer step over ``grad_accum`` rows."""
        cfg = self.config
        start = time.perf_counter()
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        kl = torch.zeros(len(self.gates), device=self.device)
        for micro in range(cfg.grad_accum):
            row = self.data[self.step * cfg.grad_accum + micro]
            kl += row_layer_kl(self.model, self.gates, row, cfg.block_size, cfg.loss_slice_ratio,
                               backward_scale=cfg.loss_scale / cfg.grad_accum, autocast=cfg.bf16_autocast)
        self.optimizer.step()
        kl = (kl / cfg.grad_accum).tolist()
        elapsed = time.perf_counter() - start
        result = StepResult(self.step, cfg.loss_scale * sum(kl), kl, lr, cfg.grad_accum * cfg.seq_len / elapsed)
        self.history.append({"step": self.step, "loss": result.loss, "lr": lr, "tokens_per_s": result.tokens_per_s})
        self.step += 1
        return result

    @torch.no_grad()
    def heldout_kl(self, rows: list[PackedRow]) -> list[float]:
        """Per-layer mean KL of the current gates over ``rows`` (no update)."""
        kl = torch.zeros(len(self.gates), device=self.device)
        for row in rows:
            kl += row_layer_kl(self.model, self.gates, row, self.config.block_size,
                               self.config.loss_slice_ratio, autocast=self.config.bf16_autocast)
        return (kl / max(len(rows), 1)).tolist()

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "config": asdict(self.config),
            "gates": self.gates.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = asdict(self.config)
        # save_every may change on resume; everything else shapes the result.
        diff = {k: (state["config"].get(k), v) for k, v in mine.items()
                if k != "save_every" and state["config"].get(k) != v}
        if diff:
            raise ValueError(f"the checkpoint was made with other settings (saved, now): {diff}")
        self.gates.load_state_dict(state["gates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.history = list(state["history"])

    def save_checkpoint(self, out_dir: Path) -> Path:
        """Write the resumable state to ``out_dir/train_state.pt`` (atomically)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)
        return path

    def load_checkpoint(self, out_dir: Path) -> bool:
        """Resume from ``out_dir/train_state.pt``; False when there is none."""
        path = out_dir / CHECKPOINT
        if not path.exists():
            return False
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        return True

    def train(
        self,
        out_dir: Path | None = None,
        progress: bool = True,
        on_step: Callable[[StepResult], None] | None = None,
    ) -> list[dict]:
        """Run from ``self.step`` to ``config.steps``, checkpointing into ``out_dir`` every
        ``save_every`` steps and at the end. Returns the history (one dict per step)."""
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, unit="step", dynamic_ncols=True)
        try:
            while self.step < cfg.steps:
                result = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{result.tokens_per_s:,.0f}", lr=f"{result.lr:.2e}")
                if out_dir is not None and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
                    self.save_checkpoint(out_dir)
                if on_step is not None:
                    on_step(result)
        finally:
            bar.close()
        return self.history
