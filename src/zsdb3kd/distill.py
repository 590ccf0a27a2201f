"""Training: teachers with cross-entropy, students with knowledge distillation.

The KD loss is the released code's (arXiv 2106.03310, section 3.3; Hinton et al.,
arXiv 1503.02531 without the ``T^2`` factor)::

    loss = CE(s(x), y) + kl_weight * sum_batch KL(softmax(z / T) || softmax(s(x) / T))

where ``z`` are the teacher's logits (from boundary distances in DB3KD, the real logits
for the white-box baseline) and ``y`` the label (ground truth in DB3KD, the teacher's
answer in zero-shot). The model is selected on a validation split (never on the test
set); test accuracy is computed once, by the caller, on the selected model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .progress import QueryProgress


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (released defaults for LeNet-5 on MNIST-like data)."""

    epochs: int = 200
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 20.0
    kl_weight: float = 1.0
    kl_reduction: str = "sum"  # "sum" over the batch as released, or "batchmean"
    seed: int = 0
    eval_batch: int = 2048

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.lr > 0 or not self.temperature > 0:  # also rejects nan
            raise ValueError(f"lr and temperature must be > 0, got {self.lr}, {self.temperature}")
        if self.kl_reduction not in ("sum", "batchmean"):
            raise ValueError(f"kl_reduction must be 'sum' or 'batchmean', got {self.kl_reduction!r}")


@dataclass
class TrainResult:
    """The selected model's state and how it was selected."""

    state_dict: dict[str, torch.Tensor]
    best_epoch: int
    best_val_acc: float
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "best_val_acc": self.best_val_acc, "wall_time_s": round(self.wall_time_s, 2)}


def kd_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
            temperature: float, kl_weight: float = 1.0, reduction: str = "sum") -> torch.Tensor:
    """CE on ``labels`` plus KL from ``softmax(teacher_logits / T)`` (see module docstring).

    Shapes: ``student_logits`` and ``teacher_logits`` ``(B, K)``, ``labels`` ``(B,)``.
    With ``teacher_logits=None`` this is plain cross-entropy.
    """
    if reduction not in ("sum", "batchmean"):
        raise ValueError(f"reduction must be 'sum' or 'batchmean', got {reduction!r}")
    loss = F.cross_entropy(student_logits, labels)
    if teacher_logits is not None and kl_weight != 0:
        log_p = F.log_softmax(student_logits / temperature, dim=1)
        q = F.softmax(teacher_logits / temperature, dim=1)
        kl = F.kl_div(log_p, q, reduction="sum")
        if reduction == "batchmean":
            kl = kl / student_logits.shape[0]
        loss = loss + kl_weight * kl
    return loss


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Images as float in [0, 1]: 8-bit (uint8) batches are divided by 255, others pass."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 2048, device: str | torch.device = "cpu") -> torch.Tensor:
    """``(N, K)`` logits of ``model`` on ``x`` ``(N, C, H, W)``, in eval mode, on the CPU."""
    was_training = model.training
    model.eval()
    out = [model(as_float(x[i : i + batch].to(device))).float().cpu() for i in range(0, x.shape[0], batch)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048, device="cpu") -> float:
    """Top-1 accuracy in percent."""
    if x.shape[0] == 0:
        raise ValueError("cannot compute accuracy on an empty set")
    return float((predict(model, x, batch, device).argmax(1) == y.cpu()).float().mean() * 100)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    config: TrainConfig,
    *,
    teacher_logits: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    desc: str = "train",
    progress: bool | None = None,
) -> TrainResult:
    """Train ``model`` on ``(x, y)`` (optionally distilling ``teacher_logits``), keeping the
    state with the best accuracy on ``(x_val, y_val)``.

    Shapes: ``x`` ``(N, C, H, W)`` in [0, 1] (or uint8 in [0, 255], converted per batch, so
    large transfer sets take a quarter of the memory), ``y`` ``(N,)``, ``teacher_logits`` ``(N, K)``.
    Deterministic under ``config.seed`` on the CPU.
    """
    N = x.shape[0]
    if y.shape != (N,):
        raise ValueError(f"labels must have shape ({N},), got {tuple(y.shape)}")
    if teacher_logits is not None and teacher_logits.shape[0] != N:
        raise ValueError(f"teacher_logits has {teacher_logits.shape[0]} rows for {N} samples")
    if x_val.shape[0] == 0:
        raise ValueError("the validation split is empty: model selection needs held-out data")
    if teacher_logits is not None and not torch.isfinite(teacher_logits).all():
        raise ValueError("teacher_logits contain non-finite values")
    device = torch.device(device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_acc, best_epoch, best_state = -1.0, -1, None
    history = []
    t0 = time.perf_counter()
    steps = math.ceil(N / config.batch_size)
    with QueryProgress(config.epochs, desc, unit="epoch", enabled=progress, log_every=15.0) as bar:
        for epoch in range(config.epochs):
            model.train()
            perm = torch.randperm(N, generator=gen)
            total = 0.0
            for s in range(steps):
                idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
                if idx.numel() < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
                    continue  # a BatchNorm batch of one cannot be trained on
                xb, yb = as_float(x[idx].to(device)), y[idx].to(device)
                tb = teacher_logits[idx].to(device) if teacher_logits is not None else None
                loss = kd_loss(model(xb), yb, tb, config.temperature, config.kl_weight, config.kl_reduction)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * idx.numel()
            val_acc = accuracy(model, x_val, y_val, config.eval_batch, device)
            history.append({"epoch": epoch, "loss": total / N, "val_acc": val_acc})
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
            bar.advance(1)
    model.load_state_dict(best_state)
    return TrainResult(best_state, best_epoch, best_acc, history, time.perf_counter() - t0)


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)
