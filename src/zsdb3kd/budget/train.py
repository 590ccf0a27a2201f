"""Training inside a budgeted run: the student, warm-started after every round, on all
labelled images so far; batches class-balanced over the teacher's labels, a share of
them shifted by a pixel (a label-preserving augmentation that costs no query) and a share
mixed with another image of the batch, their labels mixed alike (mixup).

Every random number comes from the generator passed in, so a round retrained in a fresh
process after an interruption gives the same weights.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..parallel import broadcast, is_main
from ..progress import QueryProgress
from ..store import TrainingCheckpoint
from .select import predict
from .settings import BudgetSettings


def shift(x: torch.Tensor, g: torch.Generator, pad: int = 1) -> torch.Tensor:
    """Each image translated by up to ``pad`` pixels (zero fill), vectorised."""
    b, c, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h)).to(x.device)
    cols = (dx[:, None] + torch.arange(w)).to(x.device)
    bi = torch.arange(b, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def mix(x: torch.Tensor, y: torch.Tensor, share: float, num_classes: int, g: torch.Generator
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup inside a batch: a random ``share`` of the images is blended with another image of
    the batch, the image's own weight uniform in [0.5, 1]; the targets are blended alike
    (one-hot teacher labels -> soft targets). Returns the images and ``(B, K)`` targets."""
    t = F.one_hot(y, num_classes).float()
    perm = torch.randperm(x.shape[0], generator=g)
    lam = torch.rand(x.shape[0], generator=g)
    use = (torch.rand(x.shape[0], generator=g) < share).float()
    lam = 1 - use * (1 - torch.maximum(lam, 1 - lam))
    x = lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x[perm]
    return x, lam[:, None] * t + (1 - lam[:, None]) * t[perm]


def fit(student: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: float, s: BudgetSettings,
        g: torch.Generator, num_classes: int, device: torch.device, cosine: bool, *,
        checkpoint: TrainingCheckpoint | None = None, save_every: float = 60.0, desc: str | None = None) -> dict:
    """Train ``student`` on ``(x, y)`` (on the CPU; batches move to ``device``) for ``epochs``
    passes; a cosine learning-rate schedule when ``cosine``. Returns the mean loss and steps.

    With ``checkpoint``, the state after the latest step (weights, optimiser, ``g``) is written
    there every ``save_every`` seconds, and an existing checkpoint is continued from: the same
    weights as an uninterrupted call. The caller removes it once the result is kept. ``desc``
    shows the steps' progress under that name."""
    n = x.shape[0]
    steps = int(math.ceil(epochs * n / s.batch_size)) if n else 0
    if steps == 0:
        return {"steps": 0}
    opt = torch.optim.Adam(student.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    weights = (1.0 / torch.bincount(y, minlength=num_classes).float().clamp_min(1))[y]
    total = torch.zeros((), dtype=torch.float64, device=device)  # summed where the loss is: not read back every step
    start = 0
    # rank 0 reads the state and hands it to every rank: one view of a file that rank 0 alone writes
    st = None if checkpoint is None else broadcast(
        checkpoint.load() if is_main() and checkpoint.path is not None and checkpoint.path.exists() else None)
    if st is not None:
        student.load_state_dict(st["student"])
        opt.load_state_dict(st["optimizer"])
        g.set_state(st["generator"])
        start = st["step"]
        total.fill_(st["total"])
    student.train()
    last_save = time.perf_counter()
    bar = QueryProgress(steps, desc, unit="step", initial=start, log_every=30.0, quiet_start=True) if desc else None
    try:
        for step in range(start, steps):
            if cosine:
                for group in opt.param_groups:
                    group["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            _step(student, opt, x, y, weights, s, g, num_classes, device, total)
            if bar is not None:
                bar.advance(1)
            if checkpoint is not None and step + 1 < steps and time.perf_counter() - last_save >= save_every:
                checkpoint.save({"student": student.state_dict(), "optimizer": opt.state_dict(),
                                 "generator": g.get_state(), "step": step + 1, "total": float(total)})
                last_save = time.perf_counter()
    finally:
        if bar is not None:
            bar.close()
    student.eval()
    return {"steps": steps, "loss": round(float(total) / steps, 4)}


def _step(student: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor,
          s: BudgetSettings, g: torch.Generator, num_classes: int, device: torch.device, total: torch.Tensor) -> None:
    """One optimiser step on a batch drawn from ``(x, y)``; its loss is added to ``total``."""
    if s.balanced_sampling:
        idx = torch.multinomial(weights, s.batch_size, replacement=True, generator=g)
    else:
        idx = torch.randint(0, x.shape[0], (s.batch_size,), generator=g)
    xb, yb = x[idx], y[idx]
    if s.augment_labelled > 0:
        aug = torch.rand(xb.shape[0], generator=g) < s.augment_labelled
        xb = torch.where(aug[:, None, None, None], shift(xb, g), xb)
    if s.mixup > 0:
        xb, t = mix(xb, yb, s.mixup, num_classes, g)
        if s.label_smoothing:
            t = t * (1 - s.label_smoothing) + s.label_smoothing / num_classes
        loss = -(t.to(device) * F.log_softmax(student(xb.to(device)), 1)).sum(1).mean()
    else:
        loss = F.cross_entropy(student(xb.to(device)), yb.to(device), label_smoothing=s.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    total += loss.detach().double()


def agreement(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float | None:
    """Percent of ``x`` on which ``model`` gives the label ``y`` (``None`` for no images)."""
    if x.shape[0] == 0:
        return None
    return float((predict(model, x.to(device)).argmax(1).cpu() == y).float().mean() * 100)


def planned_steps(plan: list[int], s: BudgetSettings) -> int:
    """Training steps of a run whose rounds ask ``plan`` queries: every round trains on all
    labelled images so far less the held-out share (at its expected size: it is drawn image by
    image), the last for ``final_epochs``."""
    epochs = [s.epochs_per_round] * (len(plan) - 1) + [s.final_epochs]
    steps, labelled = 0, 0
    for q, e in zip(plan, epochs):
        labelled += q
        steps += int(math.ceil(e * labelled * (1 - s.val_fraction) / s.batch_size))
    return steps


def seconds_per_step(student: nn.Module, x: torch.Tensor, num_classes: int, s: BudgetSettings,
                     device: torch.device, steps: int = 16) -> float:
    """Wall time of one training step of ``student`` on this machine, on images like the run's
    ``x`` (their content moves the time: mostly dark images train faster than noise), after four
    warm-up steps. The student's weights change: pass a throwaway copy."""
    g = torch.Generator().manual_seed(0)  # its own stream: the run's random numbers are untouched
    y = torch.arange(x.shape[0]) % num_classes
    fit(student, x, y, 4.0 * s.batch_size / x.shape[0], s, g, num_classes, device, cosine=False)  # warm-up
    t0 = time.perf_counter()
    fit(student, x, y, float(steps) * s.batch_size / x.shape[0], s, g, num_classes, device, cosine=False)
    return (time.perf_counter() - t0) / steps
