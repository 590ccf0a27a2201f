"""Training: teachers with cross-entropy, students with knowledge distillation.

The KD loss is the released code's (arXiv 2106.03310, section 3.3; Hinton et al.,
arXiv 1503.02531 without the ``T^2`` factor)::

    loss = CE(s(x), y) + kl_weight * sum_batch KL(softmax(z / T) || softmax(s(x) / T))

with the KL summed over the batch (``kl_reduction="sum"``, the released recipe) or, by
default, averaged over it (``"batchmean"``: on Fashion-MNIST DB3KD it gave students about
3.5 points more, as the summed KL at T = 20 outweighs the labels). ``z`` are the teacher's logits (from boundary distances in DB3KD, the real logits
for the white-box baseline) and ``y`` the label (ground truth in DB3KD, the teacher's
answer in zero-shot). The model is selected on a validation split (never on the test
set); test accuracy is computed once, by the caller, on the selected model.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from .models import on_device
from .parallel import all_sum, broadcast, broadcast_buffers, world
from .progress import QueryProgress
from .settings import Settings
from .store import TrainingCheckpoint

log = logging.getLogger("zsdb3kd")


AUGMENTATIONS: tuple[str, ...] = ("none", "flip-crop")


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """A randomly augmented copy of the batch ``x`` ``(B, C, H, W)``, drawn from ``generator``.

    ``"flip-crop"``: each image is mirrored left-right with probability 1/2 and shifted by up
    to ``pad`` pixels in each direction, the uncovered border filled with zeros (the usual
    CIFAR recipe: zero padding, then a random crop of the original size). Vectorised: one
    gather for the whole batch."""
    if kind == "none":
        return x
    if kind != "flip-crop":
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)}, got {kind!r}")
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=generator) < 0.5
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dev = x.device
    x = torch.where(flip.to(dev)[:, None, None, None], x.flip(-1), x)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(H)).to(dev)  # (B, H)
    cols = (dx[:, None] + torch.arange(W)).to(dev)  # (B, W)
    b = torch.arange(B, device=dev)[:, None, None]
    return xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


class TrainSettings(Settings):
    """Training: optimisation and the distillation loss."""

    epochs: int = Field(200, ge=1, description="passes over the training set")
    batch_size: int = Field(512, ge=1, description="images per step")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay")
    temperature: float = Field(20.0, gt=0, description="KD temperature T")
    kl_weight: float = Field(1.0, ge=0, description="weight of the KL term")
    kl_reduction: Literal["batchmean", "sum"] = Field(
        "batchmean", description="KL averaged over the batch, or summed as the released code does ('sum')")
    eval_batch: int = Field(2048, ge=1, description="images per evaluation step")
    augment: Literal["none", "flip-crop"] = Field(
        "none", description="flip-crop: random mirror and 4-pixel shift of each image (CIFAR recipe); a soft label "
                            "goes with every copy of its image")


TrainConfig = TrainSettings  # the name used before settings were pydantic models


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
    config: TrainSettings,
    *,
    seed: int = 0,
    teacher_logits: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    desc: str = "train",
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: float = 60.0,
) -> TrainResult:
    """Train ``model`` on ``(x, y)`` (optionally distilling ``teacher_logits``), keeping the
    state with the best accuracy on ``(x_val, y_val)``.

    Shapes: ``x`` ``(N, C, H, W)`` in [0, 1] (or uint8 in [0, 255], converted per batch, so
    large transfer sets take a quarter of the memory), ``y`` ``(N,)``, ``teacher_logits`` ``(N, K)``.
    Deterministic under ``seed`` on the CPU.

    ``checkpoint``: a file where the state after the last finished epoch is kept (model,
    optimiser, best state so far, random generators), written at most every
    ``checkpoint_every`` seconds and always when the run is interrupted. If the file exists,
    training resumes from it and ends exactly as an uninterrupted run would; it is removed
    once training finishes.

    Under torchrun (``torch.distributed`` initialised) the model is wrapped in
    DistributedDataParallel: every rank draws the same order from ``seed`` and takes its
    share of each batch (rows ``rank, rank + w, ...``), the gradients are averaged so that a
    step follows the whole batch's loss, rank 0 measures the validation accuracy and tells
    the others (BatchNorm statistics are rank 0's), so every rank selects the same epoch and
    ends with the same weights; rank 0 alone writes the checkpoint. Per-rank BatchNorm
    statistics and float summation order make the result close to, not the bits of, one
    process; resuming with another number of ranks continues from the checkpoint.
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
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rank, size = world()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    on_device(model, device).train()
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best_acc, best_epoch, best_state = -1.0, -1, None
    history: list[dict[str, float]] = []
    start, elapsed_before = 0, 0.0
    probe = slice(0, min(N, 256))  # a cheap fingerprint of the data: same size is not same data
    ckpt = TrainingCheckpoint(checkpoint, {"config": config.key(), "seed": seed, "samples": N, "shape": list(x.shape[1:]),
                                    "data": [float(as_float(x[probe]).double().sum()), int(y.sum())],
                                    "val": [int(x_val.shape[0]), int(y_val.sum())],
                                    "teacher": None if teacher_logits is None else float(teacher_logits.double().sum()),
                                    "params": {k: list(v.shape) for k, v in model.state_dict().items()}})
    if ckpt.path is not None and ckpt.path.exists():
        st = ckpt.load()
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        gen.set_state(st["generator"])
        torch.set_rng_state(st["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in st:
            torch.cuda.set_rng_state(st["cuda_rng"], device)
        best_acc, best_epoch, best_state = st["best_acc"], st["best_epoch"], st["best_state"]
        history, start, elapsed_before = st["history"], st["epoch"], st["elapsed"]
        log.info(f"{desc}: resuming after epoch {start} of {config.epochs} from {ckpt.path.name}")
    net: nn.Module = model
    if size > 1:  # after the checkpoint is loaded: DDP starts every rank from rank 0's weights
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    t0 = time.perf_counter()
    last_save = t0
    steps = math.ceil(N / config.batch_size)

    def snapshot(epoch_done: int) -> dict[str, Any]:
        # copies: training goes on changing the live tensors in place
        st = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
              "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "best_acc": best_acc,
              "best_epoch": best_epoch, "best_state": best_state, "history": list(history), "epoch": epoch_done,
              "elapsed": elapsed_before + time.perf_counter() - t0}
        if device.type == "cuda":
            st["cuda_rng"] = torch.cuda.get_rng_state(device)
        return st

    keeps = ckpt.path is not None and rank == 0  # rank 0 alone writes the checkpoint
    saved_state = snapshot(start) if keeps else None
    with QueryProgress(config.epochs, desc, unit="epoch", enabled=progress if rank == 0 else False, log_every=15.0,
                       initial=start) as bar:
        try:
            for epoch in range(start, config.epochs):
                loss = _train_epoch(net, opt, x, y, teacher_logits, config, gen, device, steps)
                if size > 1:
                    broadcast_buffers(model)  # rank 0's BatchNorm statistics everywhere: one model on every rank
                val_acc = broadcast(accuracy(model, x_val, y_val, config.eval_batch, device) if rank == 0 else None)
                history.append({"epoch": epoch, "loss": loss, "val_acc": val_acc})
                if val_acc > best_acc:
                    best_acc, best_epoch = val_acc, epoch
                    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                bar.advance(1)
                if keeps and epoch + 1 < config.epochs:
                    saved_state = snapshot(epoch + 1)
                    if time.perf_counter() - last_save >= checkpoint_every:
                        ckpt.save(saved_state)
                        last_save = time.perf_counter()
        except BaseException:
            if saved_state is not None and saved_state["epoch"] > start:
                ckpt.save(saved_state)  # the last finished epoch; the one in progress is lost
            raise
    model.load_state_dict(best_state)
    if rank == 0:
        ckpt.remove()
    return TrainResult(best_state, best_epoch, best_acc, history, elapsed_before + time.perf_counter() - t0)


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 teacher_logits: torch.Tensor | None, config: TrainSettings, gen: torch.Generator,
                 device: torch.device, steps: int) -> float:
    """One pass over ``(x, y)`` in an order drawn from ``gen``; the mean loss. Under torchrun
    ``model`` is the DDP wrapper and this rank trains on its share of each batch."""
    model.train()
    N = x.shape[0]
    perm = torch.randperm(N, generator=gen)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    rank, size = world()
    total = 0.0
    for s in range(steps):
        idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
        if size > 1:
            total += _train_shard(model, opt, x, y, teacher_logits, config, gen, device, idx, has_bn, rank, size)
            continue
        if idx.numel() < 2 and has_bn:
            continue  # a BatchNorm batch of one cannot be trained on
        xb, yb = augment_batch(as_float(x[idx].to(device)), config.augment, gen), y[idx].to(device)
        tb = teacher_logits[idx].to(device) if teacher_logits is not None else None
        loss = kd_loss(model(xb), yb, tb, config.temperature, config.kl_weight, config.kl_reduction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * idx.numel()
    return (all_sum(total) if size > 1 else total) / N


def _train_shard(model, opt, x, y, teacher_logits, config: TrainSettings, gen, device, idx: torch.Tensor,
                 has_bn: bool, rank: int, size: int) -> float:
    """One DDP step on this rank's rows of the batch ``idx``; this rank's part of ``loss * len(idx)``.

    The loss is :func:`kd_loss` of the whole batch split into per-rank sums, times ``size``:
    DDP averages the ranks' gradients, so a step follows the whole batch's gradient however
    unevenly it divides. Every rank draws the whole batch's augmentation, so ``gen`` stays
    the same everywhere; a batch some rank would get too few rows of is skipped by all."""
    B = idx.numel()
    if B // size < (2 if has_bn else 1):
        return 0.0
    if config.augment == "none":
        xb = as_float(x[idx[rank::size]].to(device))
    else:
        xb = augment_batch(as_float(x[idx].to(device)), config.augment, gen)[rank::size]
    mine = idx[rank::size]
    out = model(xb)
    loss = F.cross_entropy(out, y[mine].to(device), reduction="sum") / B
    if teacher_logits is not None and config.kl_weight != 0:
        log_p = F.log_softmax(out / config.temperature, dim=1)
        q = F.softmax(teacher_logits[mine].to(device) / config.temperature, dim=1)
        kl = F.kl_div(log_p, q, reduction="sum")
        loss = loss + config.kl_weight * (kl / B if config.kl_reduction == "batchmean" else kl)
    opt.zero_grad(set_to_none=True)
    (loss * size).backward()
    opt.step()
    return float(loss.detach()) * B
