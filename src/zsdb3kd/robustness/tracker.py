"""Per-(sample, target) query accounting for boundary searches.

Every estimator talks to the teacher only through :meth:`PairTracker.query`. The tracker

* asks the oracle (which counts the global total and enforces the global budget);
* counts the queries of each *problem* (one (sample, target) pair) and refuses, with an
  error, any call that would take a problem past its own budget, so estimators that
  forget to stop fail loudly instead of overspending;
* records, for every problem, the smallest L2 distance of any queried point that met the
  criterion, *as a function of the number of queries spent*: ``at[p, k]`` is the best
  distance found within the first ``checkpoints[k]`` queries of problem ``p``. A single
  run therefore yields the whole distance-versus-queries curve, exactly.

Distances are measured to the point actually sent (after clipping to the box).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ..oracle import LabelOracle

UNTARGETED = -1


class PairTracker:
    """Query gateway and bookkeeping for a batch of ``P`` boundary-search problems.

    Args:
        oracle: the label-only teacher.
        x0: ``(P, C, H, W)`` starting points.
        source: ``(P,)`` teacher label of each ``x0``.
        target: ``(P,)`` target class, or ``UNTARGETED`` (-1): any label other than ``source``.
        budget: queries allowed per problem (an int, or a ``(P,)`` tensor of per-problem limits).
        checkpoints: increasing query counts at which the best distance is recorded; the
            budget is appended if missing.
        on_query: optional callback receiving the number of queries of each oracle call.
    """

    def __init__(
        self,
        oracle: LabelOracle,
        x0: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        budget: int | torch.Tensor,
        checkpoints: tuple[int, ...] = (),
        on_query: Callable[[int], None] | None = None,
    ) -> None:
        P = x0.shape[0]
        limit = torch.as_tensor(budget, dtype=torch.long).to(x0.device).expand(P).clone()
        if P and int(limit.min()) < 1:
            raise ValueError(f"per-pair budget must be >= 1, got {int(limit.min())}")
        if source.shape != (P,) or target.shape != (P,):
            raise ValueError("source and target must have shape (P,)")
        top = int(limit.max()) if P else 1
        cps = sorted({int(c) for c in checkpoints if int(c) > 0} | {top})  # later limits may grow (subset)
        self.oracle = oracle
        self.x0 = x0
        self.flat0 = x0.reshape(P, -1)
        self.source = source.long()
        self.target = target.long()
        self.limit = limit  # (P,) queries each problem may make in total
        self.budget = top  # the largest per-problem budget (bounds loops)
        self.device = x0.device
        self.checkpoints = torch.tensor(cps, dtype=torch.long, device=self.device)
        self.queries = torch.zeros(P, dtype=torch.long, device=self.device)
        self.at = torch.full((P, len(cps)), float("inf"), device=self.device)
        self.on_query = on_query
        self.lower, self.upper = oracle.bounds

    def subset(self, rows: torch.Tensor, limit: torch.Tensor) -> "PairTracker":
        """A tracker for problems ``rows`` that continues their counts and records with new
        total limits ``limit`` (``(len(rows),)``); write it back with :meth:`merge`."""
        sub = PairTracker(self.oracle, self.x0[rows], self.source[rows], self.target[rows], limit,
                          tuple(self.checkpoints.tolist()), self.on_query)
        if not torch.equal(sub.checkpoints, self.checkpoints):
            raise ValueError("a continued tracker's limits must not exceed its largest checkpoint")
        sub.queries = self.queries[rows].clone()
        sub.at = self.at[rows].clone()
        return sub

    @contextlib.contextmanager
    def capped(self, queries: int) -> Iterator["PairTracker"]:
        """Within the block, no problem may pass ``queries`` queries in total (its own limit
        still holds); the limits are restored on exit."""
        saved = self.limit
        self.limit = torch.minimum(saved, torch.full_like(saved, int(queries)))
        try:
            yield self
        finally:
            self.limit = saved

    def merge(self, rows: torch.Tensor, sub: "PairTracker") -> None:
        self.queries[rows] = sub.queries
        self.at[rows] = sub.at

    @property
    def num_problems(self) -> int:
        return self.x0.shape[0]

    @property
    def best(self) -> torch.Tensor:
        """``(P,)`` best distance found so far (within the budget)."""
        return self.at[:, -1]

    def remaining(self) -> torch.Tensor:
        """``(P,)`` queries each problem may still make."""
        return self.limit - self.queries

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(self.lower, self.upper)

    def is_adversarial(self, labels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        tgt = self.target[idx]
        return torch.where(tgt == UNTARGETED, labels != self.source[idx], labels == tgt)

    @torch.no_grad()
    def query(self, idx: torch.Tensor, x: torch.Tensor, distinct: bool = False) -> torch.Tensor:
        """Ask whether the points ``x`` (``(M, C, H, W)``, clipped here) meet their problems' criteria.

        ``idx`` (``(M,)``) names the problem of each row; a problem may appear several times
        (its rows are counted in order) unless ``distinct`` says it does not (a caller that
        knows saves the ordering work). Returns a bool tensor ``(M,)``.
        """
        M = idx.numel()
        if M == 0:
            return torch.zeros(0, dtype=torch.bool, device=self.device)
        # (bincount would wait for the device to size its output)
        counts = torch.zeros_like(self.queries).index_add_(0, idx, torch.ones_like(idx))
        if bool((self.queries + counts > self.limit).any()):
            bad = int(torch.nonzero(self.queries + counts > self.limit)[0])
            raise RuntimeError(
                f"estimator bug: problem {bad} would exceed its per-pair budget of {int(self.limit[bad])}"
            )
        x = self.clip(x)
        labels = self.oracle(x)
        adv = self.is_adversarial(labels, idx)
        # ordinal (1-based) of each row among its problem's queries, rows counted in order
        ordinal = self.queries[idx] + 1
        if not distinct:
            order = torch.argsort(idx, stable=True)
            sorted_idx = idx[order]
            first = torch.searchsorted(sorted_idx, sorted_idx, right=False)
            rank = torch.empty_like(idx)
            rank[order] = torch.arange(M, device=self.device) - first
            ordinal += rank
        dist = (x.reshape(M, -1) - self.flat0[idx]).norm(dim=1)
        ok = adv[:, None] & (ordinal[:, None] <= self.checkpoints[None, :])
        vals = torch.where(ok, dist[:, None], torch.full_like(dist[:, None], float("inf")))
        self.at.scatter_reduce_(0, idx[:, None].expand_as(vals), vals, reduce="amin")
        self.queries += counts
        if self.on_query is not None:
            self.on_query(M)
        return adv
