"""BD, boundary distance: bisection along directions to target-class samples (arXiv 2106.03310)."""

from __future__ import annotations

import math

import torch

from ..search import Estimator, SearchResult, randn_on, unit
from .registry import ESTIMATORS


class BoundaryDistance(Estimator):
    """BD: for each of ``n`` directions, bisect the step at which the criterion is met.

    Directions point to pool samples of the target class (targeted) or are random
    Gaussian (``random=True``, or when no pool is given: untargeted search). One query at
    the current best step first tells whether a direction can improve; only then is it
    bisected, down to ``tol`` (absolute, in L2 units). The candidate's own end point is
    verified too, so a pool sample the teacher does not label ``target`` is skipped.
    Every problem sends one query per engine step, so batches stay full.
    """

    name = "bd"

    def __init__(self, n: int = 201, tol: float = 1e-5, random: bool = False, warm: torch.Tensor | None = None,
                 warm_len: torch.Tensor | None = None) -> None:
        if n < 1 or tol <= 0:
            raise ValueError(f"need n >= 1 and tol > 0, got n={n}, tol={tol}")
        self.n, self.tol, self.random = n, tol, random
        #: optional ``(P, D)`` directions tried first (e.g. last iteration's best), then ``n - 1`` others,
        #: with optional ``(P,)`` steps known to reach the criterion (default: the box diameter)
        self.warm, self.warm_len = warm, warm_len

    def __repr__(self) -> str:
        return f"BoundaryDistance(n={self.n}, tol={self.tol}, random={self.random}, warm={self.warm is not None})"

    def _run(self, tracker, pool, generator):
        tr = tracker
        P, D = tr.flat0.shape
        dev = tr.device
        use_random = self.random or pool is None
        max_len = math.sqrt(D) * (tr.upper - tr.lower)  # box diameter
        cand = None if use_random else pool.draw(tr.target, self.n, generator)
        if use_random:
            # one Gaussian direction per (problem, j), drawn lazily per j to bound memory
            seeds = torch.randint(0, 2**62, (self.n,), generator=generator).tolist()

        warm = self.warm
        if warm is not None and warm.shape != (P, D):
            raise ValueError(f"warm directions must have shape ({P}, {D}), got {tuple(warm.shape)}")

        def load(ids: torch.Tensor, jj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if warm is not None:
                first = jj == 0
                theta, length = load_other(ids, (jj - 1).clamp_min(0))
                w, _ = unit(warm[ids].to(dev))
                theta = torch.where(first[:, None], w, theta)
                wl = torch.full_like(length, max_len) if self.warm_len is None else self.warm_len[ids].to(dev)
                wl = torch.where(torch.isfinite(wl), wl * (1 + 1e-4), torch.full_like(wl, max_len))
                length = torch.where(first, wl, length)
                return theta, length
            return load_other(ids, jj)

        def load_other(ids: torch.Tensor, jj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if use_random:
                out = torch.empty(ids.numel(), D, device=dev)
                for j in torch.unique(jj).tolist():
                    rows = torch.nonzero(jj == j).squeeze(1)
                    g = torch.Generator(device="cpu").manual_seed(seeds[j])
                    full = randn_on((P, D), g, dev)
                    out[rows] = full[ids[rows]]
                theta, _ = unit(out)
                return theta, torch.full((ids.numel(),), max_len, device=dev)
            c = cand[ids, jj]
            theta, dist = unit(pool.flat[c.clamp_min(0)] - tr.flat0[ids])
            dist = torch.where((c >= 0) & (dist > 1e-8), dist, torch.full_like(dist, float("inf")))
            return theta, dist

        best_lam = torch.full((P,), float("inf"), device=dev)
        best_theta = torch.zeros(P, D, device=dev)
        j = torch.zeros(P, dtype=torch.long, device=dev)
        bisecting = torch.zeros(P, dtype=torch.bool, device=dev)
        lo = torch.zeros(P, device=dev)
        hi = torch.zeros(P, device=dev)
        theta = torch.zeros(P, D, device=dev)
        length = torch.zeros(P, device=dev)
        reload = torch.ones(P, dtype=torch.bool, device=dev)
        # One step = one query per live problem. The state is updated with whole-(P,) masks, not
        # index lists, so a step waits for the device only where it must: which problems reload
        # a direction, which skip one, which ask (each a data-dependent size).
        for _ in range(self.n * 80 + 10):  # hard cap; the budget normally ends it first
            live = (j < self.n) & (tr.remaining() > 0)
            ids = torch.nonzero(reload & live).squeeze(1)
            reload[:] = False
            if ids.numel():
                theta[ids], length[ids] = load(ids, j[ids])
                # directions with no usable end point are skipped without a query (only a direction
                # just loaded can be one: the others passed this test when they were loaded)
                skip = live & ~bisecting & ~torch.isfinite(length)
                if bool(skip.any()):
                    j += skip
                    reload |= skip
                    continue
            ids = torch.nonzero(live).squeeze(1)
            if not ids.numel():
                break
            checking = live & ~bisecting
            lam = torch.where(checking, torch.minimum(best_lam, length), (lo + hi) / 2)
            adv = torch.zeros_like(live)
            adv[ids] = tr.query(ids, tr.x0[ids] + (lam[ids, None] * theta[ids]).view_as(tr.x0[ids]), distinct=True)
            # check step: adversarial -> start bisecting [0, lam]; else next direction
            start = checking & adv
            nxt = checking & ~adv
            lo = torch.where(start, 0.0, lo)
            hi = torch.where(start, lam, hi)
            bisecting |= start
            # bisection step
            bis = live & ~checking
            hi = torch.where(bis & adv, lam, hi)
            lo = torch.where(bis & ~adv, lam, lo)
            fin = live & bisecting & ((hi - lo) <= self.tol)
            better = fin & (hi < best_lam)
            best_lam = torch.where(better, hi, best_lam)
            best_theta = torch.where(better[:, None], theta, best_theta)
            bisecting &= ~fin
            done_dir = nxt | fin
            j += done_dir
            reload |= done_dir
        # a bisection cut short by the budget still holds a verified adversarial hi
        cut = bisecting & (hi < best_lam)
        best_lam[cut] = hi[cut]
        best_theta[cut] = theta[cut]
        return SearchResult(best_theta, best_lam)



@ESTIMATORS.register("bd")
def bd(n: int = 201, tol: float = 1e-5, random: bool = False) -> BoundaryDistance:
    """The released settings: 201 directions, bisection to 1e-5."""
    return BoundaryDistance(n=n, tol=tol, random=random)
