"""Soft labels from boundary distances (arXiv 2106.03310, section 3.3; docs/method.md).

A sample close to class ``t``'s boundary resembles ``t``, so distances become logits

    z_t = 1 / d_t                 for every class t != c (the teacher's own label)
    z_c = sum_{t != c} 1 / d_t

and the soft target is ``softmax(z / T)``. A pair whose search found no boundary point
(``d_t = inf``) gets ``z_t = 0``: the sample resembles ``t`` least of all.
"""

from __future__ import annotations

import torch

#: Distances below this are treated as this (guards 1/0; a real boundary is never that close).
MIN_DISTANCE = 1e-6


def logits_from_distances(distances: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Teacher "logits" from distances.

    Args:
        distances: ``(N, K)`` L2 distance of each sample to each class (the entry of the
            sample's own class is ignored, usually ``nan``); ``inf`` means "not reached".
        labels: ``(N,)`` the teacher's label ``c`` of each sample.

    Returns:
        ``(N, K)`` float tensor ``z`` as above.
    """
    if distances.dim() != 2 or labels.shape != distances.shape[:1]:
        raise ValueError(f"need distances (N, K) and labels (N,), got {tuple(distances.shape)} and {tuple(labels.shape)}")
    if bool((labels < 0).any()) or bool((labels >= distances.shape[1]).any()):
        raise ValueError("labels out of range of the distance matrix's classes")
    d = distances.double()
    own = torch.nn.functional.one_hot(labels.long(), d.shape[1]).bool()
    other = d.masked_fill(own, float("inf"))
    if bool((other[~own] < 0).any()) or bool(torch.isnan(other[~own]).any()):
        raise ValueError("distances to other classes must be >= 0 or inf (found negative or nan)")
    z = 1.0 / other.clamp_min(MIN_DISTANCE)
    z = z.masked_fill(own, 0.0)
    z = z + own * z.sum(dim=1, keepdim=True)
    return z.float()


def soft_targets(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax(logits / T)`` along the class dimension."""
    if not temperature > 0:  # also rejects nan
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(logits / temperature, dim=1)


FORMAT = "zsdb3kd-soft-labels"


def save_soft_labels(path, logits: torch.Tensor, indices: torch.Tensor, teacher_labels: torch.Tensor,
                     temperature: float, provenance: dict | None = None):
    """Write soft labels for external use or ``zsdb3kd distill --soft-labels``: ``logits`` and
    ``soft`` (``softmax(logits / T)``) ``(N, K)``, ``indices`` ``(N,)`` into the source set and
    the teacher's ``teacher_labels`` ``(N,)``."""
    from .store import save_tagged

    prov = {"temperature": temperature, **(provenance or {})}
    return save_tagged(path, {"logits": logits, "soft": soft_targets(logits, temperature), "indices": indices,
                              "teacher_labels": teacher_labels}, FORMAT, prov)


def load_soft_labels(path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """``(logits, indices, teacher_labels, provenance)`` of a file written by :func:`save_soft_labels`."""
    from .store import load_tagged

    t, prov = load_tagged(path, FORMAT, "soft-label")
    return t["logits"], t["indices"], t["teacher_labels"], prov
