"""The result of a robustness run: distances of every sample to every other class, at every
checkpoint budget, and what they cost."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..softlabels import logits_from_distances
from ..store import load_tagged, save_tagged

FORMAT = "zsdb3kd-robustness"


@dataclass
class RobustnessResult:
    """Distances of ``N`` samples to each of ``K`` classes.

    ``distances``: ``(N, K, B)`` best L2 distance within each checkpoint budget
    (``nan`` for the sample's own class, ``inf`` where no boundary point was found);
    ``queries``: ``(N, K)`` queries spent per pair; ``teacher_labels``: ``(N,)``;
    ``indices``: ``(N,)`` positions in the source dataset; ``checkpoints``: ``(B,)``.
    """

    distances: torch.Tensor
    queries: torch.Tensor
    teacher_labels: torch.Tensor
    indices: torch.Tensor
    checkpoints: torch.Tensor
    provenance: dict[str, Any]

    def at(self, budget: int | None = None) -> torch.Tensor:
        """``(N, K)`` distances at the largest checkpoint ``<= budget`` (default: the last)."""
        if budget is None:
            return self.distances[:, :, -1]
        ok = torch.nonzero(self.checkpoints <= budget).squeeze(1)
        if ok.numel() == 0:
            raise ValueError(f"no checkpoint <= {budget}; checkpoints are {self.checkpoints.tolist()}")
        return self.distances[:, :, int(ok[-1])]

    def logits(self, budget: int | None = None) -> torch.Tensor:
        """``(N, K)`` soft-label logits (z_t = 1/d_t, z_c = sum) at ``budget`` queries per pair."""
        return logits_from_distances(self.at(budget), self.teacher_labels)

    def queries_at(self, budget: int | None = None) -> int:
        """Teacher queries a run with a per-pair budget of ``budget`` would have made (labels included)."""
        q = self.queries if budget is None else self.queries.clamp(max=budget)
        return int(q.sum()) + len(self.indices)

    def mean_queries_per_pair(self, budget: int | None = None) -> float:
        own = torch.isnan(self.at(budget))
        q = self.queries if budget is None else self.queries.clamp(max=budget)
        spent = q[~own].float()
        return round(float(spent.mean()), 1) if spent.numel() else 0.0

    @property
    def total_queries(self) -> int:
        return int(self.provenance.get("total_queries", self.queries_at()))

    def save(self, path: str | os.PathLike) -> Path:
        tensors = {k: getattr(self, k) for k in ("distances", "queries", "teacher_labels", "indices", "checkpoints")}
        return save_tagged(path, tensors, FORMAT, self.provenance)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RobustnessResult":
        tensors, provenance = load_tagged(path, FORMAT, "robustness")
        return cls(provenance=provenance, **tensors)
