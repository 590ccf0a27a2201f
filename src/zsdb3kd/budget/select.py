"""Acquisition: which free candidates are worth a teacher query.

All functions are vectorised over the candidates and draw randomness only from the
generator they are given.

* :func:`predict` -- softmax of a (white-box, free) student over a large batch.
* :func:`uncertainty` -- ``margin`` (1 - (p1 - p2)), ``entropy``, ``random`` (no preference),
  ``confident`` (the opposite: the student's top probability, prototypes of each class), or
  ``committee`` (two snapshots of the student, now and one round earlier: the margin of
  their mean plus how far apart they are, in total variation).
* :func:`choose` -- pick ``k`` candidates: per predicted class an equal quota (class
  balance), and within a class the most uncertain of a random subset (a soft top-k, so a
  tight cluster of near-duplicates is not all taken).
* :func:`same_class_partners` -- for labelled images to vary, a random partner of the same
  teacher label to cross them with (``mutate_same_class``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .settings import ACQUISITIONS


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([F.softmax(model(x[i:i + batch]), 1) for i in range(0, x.shape[0], batch)]) if x.shape[0] else \
        torch.empty(0, 0)
    model.train(was)
    return out


def uncertainty(p: torch.Tensor, kind: str, earlier: torch.Tensor | None = None) -> torch.Tensor:
    """Higher = more worth querying. ``earlier``: the same candidates under an earlier
    snapshot of the student (``committee``; without it, ``committee`` is ``margin``)."""
    if kind == "committee":
        if earlier is None:
            return uncertainty(p, "margin")
        return uncertainty((p + earlier) / 2, "margin") + 0.5 * (p - earlier).abs().sum(1)
    if kind == "margin":
        top = p.topk(2, dim=1).values
        return 1 - (top[:, 0] - top[:, 1])
    if kind == "entropy":
        return -(p * p.clamp_min(1e-12).log()).sum(1)
    if kind == "random":
        return torch.zeros(p.shape[0])
    if kind == "confident":
        return p.max(1).values
    raise ValueError(f"unknown acquisition {kind!r}; known: {', '.join(ACQUISITIONS)}")


def choose(score: torch.Tensor, pred: torch.Tensor, k: int, num_classes: int, g: torch.Generator, *,
           balance: bool = True, explore: float = 2.0, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of ``k`` distinct candidates.

    ``explore`` >= 1: within each class, the pick is the top of a random
    ``1/explore`` share of that class's candidates ranked by ``score`` (plus noise), so
    higher values trade greed for diversity. With ``balance``, each predicted class gets
    the quota ``k * class_weight[c]`` (default uniform); quotas a class cannot fill go to
    the others by score.
    """
    n = score.shape[0]
    if k > n:
        raise ValueError(f"cannot choose {k} of {n} candidates")
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    # random tie-break + soft top-k: a random key in [0, 1) scaled by the explore factor
    key = score.float().clone()
    spread = (key.max() - key.min()).clamp_min(1e-6)
    key = (key - key.min()) / spread
    if explore > 1:
        drop = torch.rand(n, generator=g) > 1.0 / explore
        key = key + torch.rand(n, generator=g) * 1e-3 - drop.float() * 2.0
    else:
        key = key + torch.rand(n, generator=g) * 1e-3
    if not balance:
        return key.topk(k).indices.sort().values
    w = torch.full((num_classes,), 1.0 / num_classes) if class_weight is None else class_weight / class_weight.sum()
    quota = torch.floor(w * k).long()
    rest = k - int(quota.sum())
    if rest:
        extra = torch.multinomial(w, rest, replacement=True, generator=g)
        quota += torch.bincount(extra, minlength=num_classes)
    # rank inside each class: sort by class, then by key (descending)
    by_key = torch.argsort(-key, stable=True)
    order = by_key[torch.argsort(pred[by_key], stable=True)]
    sorted_pred = pred[order]
    start = torch.searchsorted(sorted_pred, torch.arange(num_classes))
    rank = torch.arange(n) - start[sorted_pred]
    take = rank < quota[sorted_pred]
    chosen = order[take]
    if chosen.numel() < k:  # classes short of candidates: fill by key from the rest
        left = torch.ones(n, dtype=torch.bool)
        left[chosen] = False
        idx = torch.nonzero(left).squeeze(1)
        chosen = torch.cat([chosen, idx[key[idx].topk(k - chosen.numel()).indices]])
    return chosen.sort().values


def same_class_partners(y: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """For each ``idx[i]``, the index of a random image with the same label ``y`` (itself
    when it is its class's only one). Vectorised: indices sorted by label, one uniform draw
    into each class's block."""
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y, minlength=int(y.max()) + 1 if y.numel() else 0)
    starts = torch.cumsum(counts, 0) - counts
    c = y[idx]
    pos = starts[c] + (torch.rand(idx.shape[0], generator=g) * counts[c]).long().clamp_max(counts[c] - 1)
    return order[pos]
