"""Splits of a dataset: stratified train/validation, deterministic subsets, fingerprints."""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..settings import ConfigError, content_key
from ..store import derive_seed
from .base import ImageSet


def train_val_split(labels: torch.Tensor, val_size: int | float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified split of ``labels`` (N,) -> sorted int64 (train_idx, val_idx), disjoint, covering range(N).

    ``val_size`` is a count (int in [0, N-1]) or a fraction (float in (0, 1)). Each class contributes
    in proportion (largest-remainder rounding); if the count allows, every class with >= 2 samples
    gets at least one validation sample. Deterministic for a given ``seed``.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
    n = labels.numel()
    if n < 2:
        raise ValueError(f"need at least 2 samples to split, got {n}")
    if isinstance(val_size, numbers.Integral) and not isinstance(val_size, bool):
        n_val = int(val_size)
        if not 0 <= n_val < n:
            raise ValueError(f"val_size={val_size} must be an int in [0, {n - 1}] or a float in (0, 1)")
    elif isinstance(val_size, numbers.Real) and not isinstance(val_size, bool):
        if not 0.0 < float(val_size) < 1.0:
            raise ValueError(f"val_size={val_size} as a fraction must lie strictly between 0 and 1")
        n_val = min(max(1, round(float(val_size) * n)), n - 1)
    else:
        raise ValueError(f"val_size must be an int or a float, got {type(val_size).__name__}")
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    quota = _stratified_quota(counts, n_val)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    grouped, order = torch.sort(inverse[perm], stable=True)  # classes in blocks, random order inside
    idx = perm[order]
    rank = torch.arange(n) - (torch.cumsum(counts, 0) - counts)[grouped]
    is_val = rank < quota[grouped]
    return idx[~is_val].sort().values, idx[is_val].sort().values


def _stratified_quota(counts: torch.Tensor, n_val: int) -> torch.Tensor:
    """Per-class validation counts (K,) summing to ``n_val``, proportional to ``counts`` (K,)."""
    ideal = counts.double() * n_val / float(counts.sum())
    quota = ideal.floor().long()
    rest = n_val - int(quota.sum())
    if rest > 0:
        quota[torch.argsort(ideal - quota, descending=True, stable=True)[:rest]] += 1
    floor = (counts >= 2).long()  # classes that can spare one sample for validation
    if n_val >= int(floor.sum()):
        for k in (quota < floor).nonzero().flatten().tolist():
            surplus = torch.where(quota > floor, quota - ideal, torch.full_like(ideal, -math.inf))
            donor = int(surplus.argmax())
            quota[donor] -= 1
            quota[k] += 1
    return quota


def dataset_fingerprint(ds: ImageSet) -> str:
    """sha256 hex digest of the bytes of ``ds.x`` (float32, C-contiguous) followed by ``ds.y`` (int64)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ds.x.detach().cpu().numpy()).data)
    h.update(np.ascontiguousarray(ds.y.detach().cpu().numpy()).data)
    return h.hexdigest()


@dataclass
class Splits:
    """The training data carved into train/val, plus the test set."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    fingerprint: str


def make_splits(full: ImageSet, test: ImageSet, val_size: int | float, seed: int) -> Splits:
    """``full`` split into train and a stratified validation slice of ``val_size``."""
    tr, va = train_val_split(full.y, val_size, seed)
    fp = content_key(dataset_fingerprint(full), dataset_fingerprint(test), val_size, seed, length=12)
    return Splits(full.subset(tr), full.subset(va), test, fp)


def choose_subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``n`` of ``n_total`` items, deterministic under ``seed``."""
    if n < 1:
        raise ConfigError(f"subset must be >= 1, got {n}")
    if n > n_total:
        raise ConfigError(f"subset of {n} requested but only {n_total} samples are available")
    g = torch.Generator().manual_seed(derive_seed(seed, "subset"))
    return torch.randperm(n_total, generator=g)[:n].sort().values
