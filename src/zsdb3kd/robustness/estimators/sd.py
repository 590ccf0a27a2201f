"""SD, sample distance (0 queries; arXiv 2106.03310 section 3.2)."""

from __future__ import annotations

import torch

from ..search import Estimator, SearchResult, unit
from ..tracker import UNTARGETED
from .registry import ESTIMATORS


class SampleDistance(Estimator):
    """SD: L2 distance to the nearest of ``n`` random pool samples of the target class (0 queries)."""

    name = "sd"
    needs_pool = True

    def max_queries_per_pair(self, budget: int) -> int:
        return 0

    def __init__(self, n: int = 21) -> None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n

    def _run(self, tracker, pool, generator):
        if bool((tracker.target == UNTARGETED).any()):
            raise ValueError("SD is defined for targeted problems only")
        cand = pool.draw(tracker.target, self.n, generator)
        P, D = tracker.flat0.shape
        best = torch.full((P,), float("inf"), device=tracker.device)
        theta = torch.zeros(P, D, device=tracker.device)
        for j in range(self.n):  # loop over candidates, vectorised over problems
            ok = cand[:, j] >= 0
            diff = pool.flat[cand[:, j].clamp_min(0)] - tracker.flat0
            u, d = unit(diff)
            better = ok & (d > 0) & (d < best)
            best = torch.where(better, d, best)
            theta = torch.where(better[:, None], u, theta)
        tracker.at[:] = best[:, None]  # known without a single query
        return SearchResult(theta, best)



@ESTIMATORS.register("sd")
def sd(n: int = 21) -> SampleDistance:
    """The released settings: the nearest of 21 random target-class samples."""
    return SampleDistance(n=n)
