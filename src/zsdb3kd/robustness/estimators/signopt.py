"""MBD: Sign-OPT refinement of a BD start (Cheng et al., arXiv 1909.10773; arXiv 2106.03310)."""

from __future__ import annotations

import torch

from ..search import MAX_ELEMS, Estimator, SearchResult, local_search, randn_on, scatter, unit
from .registry import ESTIMATORS
from .bd import BoundaryDistance


class SignOPT(Estimator):
    """MBD: Sign-OPT refinement (arXiv 1909.10773) of a BD initialisation.

    ``g(theta)`` is the smallest step along unit direction ``theta`` that meets the
    criterion. Each iteration estimates the sign of its gradient from ``k`` random probes
    at distance ``beta`` (one query each, at ``g(theta)``), then line-searches the step
    ``alpha`` (doubling while ``g`` improves, else quartering), each candidate evaluated
    by a local bracket (1% steps) and bisection to ``beta / 500``. When nothing improves,
    ``alpha`` resets and ``beta`` shrinks tenfold. ``alpha`` and ``beta`` are per problem.
    Stops at the per-problem budget.

    Args:
        init: the initialisation estimator (default: BD with 201 directions).
        k: probes per gradient estimate.
        alpha, beta: initial step size and probe radius.
        ls_steps: cap on line-search candidates per phase.
        reuse: weight of the previous iteration's probes: the step direction is this
            iteration's sign sum plus ``reuse`` times the last one, so the ``k`` answers of an
            iteration still count in the next. ``0`` (the paper) uses each probe once; a
            problem whose ``beta`` shrinks starts afresh (its old probes had another radius).
    """

    name = "signopt"
    iterative = True

    def __init__(self, init: Estimator | None = None, k: int = 200, alpha: float = 0.2, beta: float = 1e-3,
                 ls_steps: int = 15, reuse: float = 0.0) -> None:
        if k < 1 or alpha <= 0 or beta <= 0:
            raise ValueError(f"need k >= 1, alpha > 0, beta > 0; got k={k}, alpha={alpha}, beta={beta}")
        if not 0 <= reuse <= 1:
            raise ValueError(f"reuse must be in [0, 1], got {reuse}")
        self.init = init if init is not None else BoundaryDistance()
        self.k, self.alpha, self.beta, self.ls_steps, self.reuse = k, alpha, beta, ls_steps, reuse

    def _run(self, tracker, pool, generator):
        tr = tracker
        start = self.init(tr, pool, generator)
        theta, g = start.theta.clone(), start.lam.clone()
        P, D = theta.shape
        dev = tr.device
        alpha = torch.full((P,), self.alpha, device=dev)
        beta = torch.full((P,), self.beta, device=dev)
        done = ~torch.isfinite(g)
        prev = torch.zeros_like(theta) if self.reuse > 0 else None  # last sign sum, at the current beta
        max_iter = tr.budget // max(self.k, 1) + 2
        for _ in range(max_iter):
            act = ~done & (tr.remaining() >= self.k + 1)
            done |= ~act
            if not bool(act.any()):
                break
            ids = torch.nonzero(act).squeeze(1)
            grad = self._sign_grad(tr, ids, theta[ids], g[ids], beta[ids], generator)
            if prev is not None:
                fresh = grad
                grad = grad + self.reuse * prev[ids]
                prev[ids] = fresh
            new_theta, new_g, new_alpha = self._line_search(tr, ids, theta[ids], g[ids], grad, alpha[ids], beta[ids])
            stuck = new_g >= g[ids]
            theta[ids], g[ids] = new_theta, new_g
            alpha[ids] = new_alpha
            small = stuck & (new_alpha < 1e-4)
            alpha[ids[small]] = 1.0
            beta[ids[small]] *= 0.1
            if prev is not None:
                prev[ids[small]] = 0.0  # probes at the old radius: start afresh
            done[ids[small & (beta[ids] < 1e-8)]] = True
        return SearchResult(theta, g)

    def _sign_grad(self, tr, ids, theta, g, beta, generator) -> torch.Tensor:
        n, D = theta.shape
        grad = torch.zeros_like(theta)
        chunk = max(1, min(self.k, MAX_ELEMS // max(1, n * D)))
        for s in range(0, self.k, chunk):
            kc = min(chunk, self.k - s)
            u = randn_on((n, kc, D), generator, theta.device)
            u = u / u.norm(dim=2, keepdim=True) * beta[:, None, None]
            probe, _ = unit(theta[:, None, :] + u)
            x = tr.flat0[ids][:, None, :] + g[:, None, None] * probe
            adv = tr.query(ids.repeat_interleave(kc), x.reshape(n * kc, *tr.x0.shape[1:]))
            sign = torch.where(adv, -1.0, 1.0).view(n, kc, 1)
            grad += (sign * u).sum(dim=1)
        return grad

    def _line_search(self, tr, ids, theta, g, grad, alpha, beta):
        # whole-mask updates (torch.where), not index lists: see search.scatter
        best_theta, best_g = theta.clone(), g.clone()
        a = alpha.clone()
        tol = beta / 500
        n = ids.numel()
        grow = torch.ones_like(g, dtype=torch.bool)
        for _ in range(self.ls_steps):
            grow &= tr.remaining()[ids] > 0
            r = torch.nonzero(grow).squeeze(1)
            if not r.numel():
                break
            cand, _ = unit(theta[r] - a[r, None] * grad[r])
            cg = scatter(n, r, local_search(tr, ids[r], cand, best_g[r], tol[r]), float("inf"))
            imp = cg < best_g
            best_theta = torch.where(imp[:, None], scatter(n, r, cand, 0.0), best_theta)
            best_g = torch.where(imp, cg, best_g)
            a = torch.where(imp, a * 2, a)
            grow &= imp
        a = torch.where(best_g < g, a / 2, a)  # last successful step
        shrink = best_g >= g
        for _ in range(self.ls_steps):
            shrink &= tr.remaining()[ids] > 0
            r = torch.nonzero(shrink).squeeze(1)
            if not r.numel():
                break
            a = torch.where(shrink, a * 0.25, a)
            cand, _ = unit(theta[r] - a[r, None] * grad[r])
            cg = scatter(n, r, local_search(tr, ids[r], cand, g[r], tol[r]), float("inf"))
            imp = cg < g
            best_theta = torch.where(imp[:, None], scatter(n, r, cand, 0.0), best_theta)
            best_g = torch.where(imp, cg, best_g)
            shrink &= ~imp
        return best_theta, best_g, a



@ESTIMATORS.register("mbd")
def mbd(n_dirs: int = 201, tol: float = 1e-5, **kw) -> SignOPT:
    """The paper's MBD: BD with 201 directions, then Sign-OPT with K=200, alpha 0.2, beta 0.001."""
    return SignOPT(init=BoundaryDistance(n=n_dirs, tol=tol), **kw)
