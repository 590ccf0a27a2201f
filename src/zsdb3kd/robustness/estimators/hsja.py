"""A targeted HopSkipJump-style search (Chen, Jordan, Wainwright; arXiv 1904.02144)."""

from __future__ import annotations

import math

import torch

from ..search import MAX_ELEMS, Estimator, SearchResult, randn_on, scatter, unit
from .registry import ESTIMATORS
from .bd import BoundaryDistance


class HopSkipJump(Estimator):
    """Targeted L2 HopSkipJump-style search (Chen, Jordan, Wainwright; arXiv 1904.02144).

    From a BD initialisation (a few directions, coarse tolerance), repeat: estimate the
    boundary's normal at the current boundary point ``x_b`` from ``n0 * sqrt(t)`` (at most
    ``n_max``) random probes at radius ``delta`` (answers centred by their mean to reduce
    variance), take a geometric step ``eps = ||x_b - x0|| / sqrt(t)`` along it (halved until
    the point meets the criterion), then bisect on the segment from ``x0`` to that point
    back to the boundary (relative tolerance ``tol``). Points on the segment between two
    in-box points stay in the box, so no clipping distorts the geometry. Per-problem state
    throughout; stops at the per-problem budget.

    ``subspace = s > 1`` draws the probes in a low-frequency subspace: Gaussian noise at
    ``1/s`` of the image's height and width, bilinearly upsampled (the idea of QEBA,
    arXiv 2005.14137). Fewer dimensions make each probe more informative, so the boundary
    normal is found with fewer queries; because the optimum need not lie in the subspace,
    a problem switches to full-resolution probes once it has spent ``subspace_queries``
    queries (``None``: never switches).

    ``update = "circle"`` replaces the step search and the bisection by a bisection of the
    angle on the half circle with diameter ``x0 -> x_b`` in the plane of ``x_b - x0`` and
    the normal estimate (see :meth:`_circle`): no step schedule, and on a flat boundary it
    lands on the closest point of that plane.
    """

    name = "hsja"
    iterative = True

    def __init__(self, init: Estimator | None = None, n0: int = 50, n_max: int = 400, tol: float = 1e-3,
                 gamma: float = 1.0, step_tries: int = 12, subspace: int = 1,
                 subspace_queries: int | None = None, update: str = "step") -> None:
        if n0 < 2 or n_max < n0 or not 0 < tol < 1:
            raise ValueError(f"need 2 <= n0 <= n_max and 0 < tol < 1; got n0={n0}, n_max={n_max}, tol={tol}")
        if int(subspace) != subspace or subspace < 1:
            raise ValueError(f"subspace must be an integer resize factor >= 1, got {subspace}")
        if subspace_queries is not None and subspace_queries < 0:
            raise ValueError(f"subspace_queries must be >= 0 or None, got {subspace_queries}")
        if update not in ("step", "circle"):
            raise ValueError(f"update must be 'step' or 'circle', got {update!r}")
        self.update = update
        self.init = init if init is not None else BoundaryDistance(n=20, tol=1e-3)
        self.n0, self.n_max, self.tol, self.gamma, self.step_tries = n0, n_max, tol, gamma, step_tries
        self.subspace, self.subspace_queries = int(subspace), subspace_queries

    def _run(self, tracker, pool, generator):
        tr = tracker
        start = self.init(tr, pool, generator)
        P, D = start.theta.shape
        dev = tr.device
        x0 = tr.flat0
        ok = torch.isfinite(start.lam)
        lam = torch.where(ok, start.lam, torch.zeros_like(start.lam))
        xb = x0 + lam[:, None] * start.theta
        xb = xb.clamp(tr.lower, tr.upper)  # the point the init actually verified
        dist = (xb - x0).norm(dim=1)
        done = ~ok
        t = torch.ones(P, device=dev)
        for _ in range(tr.budget):  # every round costs >= 1 query, so this bound is never the limit
            n_t = torch.clamp(self.n0 * t.sqrt(), max=self.n_max).long()
            act = ~done & (tr.remaining() >= n_t + 2)
            done |= ~act
            if not bool(act.any()):
                break
            ids = torch.nonzero(act).squeeze(1)
            grad = self._grad(tr, ids, xb[ids], dist[ids], n_t[ids], generator)
            if self.update == "circle":
                new_xb, new_d = self._circle(tr, ids, xb[ids], dist[ids], grad)
                better = new_d < dist[ids]
                xb[ids[better]] = new_xb[better]
                dist[ids[better]] = new_d[better]
                t[ids] += 1
                continue
            # geometric step search along the estimated normal (toward the target side)
            # (state updated with whole masks, not index lists: see search.scatter)
            n = ids.numel()
            eps = dist[ids] / t[ids].sqrt()
            cand = xb[ids].clone()
            pending = torch.ones(n, dtype=torch.bool, device=dev)
            for _ in range(self.step_tries):
                pending &= tr.remaining()[ids] > 1
                r = torch.nonzero(pending).squeeze(1)
                if not r.numel():
                    break
                trial = (xb[ids[r]] + eps[r, None] * grad[r]).clamp(tr.lower, tr.upper)
                adv = scatter(n, r, tr.query(ids[r], trial.view(-1, *tr.x0.shape[1:]), distinct=True))
                cand[r] = torch.where(adv[r, None], trial, cand[r])
                eps = torch.where(pending & ~adv, eps / 2, eps)
                pending &= ~adv
            # bisect on the segment x0 -> cand (cand meets the criterion; x0 does not)
            lo = torch.zeros(n, device=dev)
            hi = torch.ones(n, device=dev)
            seg = cand - x0[ids]
            active = ~pending
            for _ in range(40):
                active &= (hi - lo > self.tol) & (tr.remaining()[ids] > 0)
                r = torch.nonzero(active).squeeze(1)
                if not r.numel():
                    break
                mid = (lo[r] + hi[r]) / 2
                adv = tr.query(ids[r], (x0[ids[r]] + mid[:, None] * seg[r]).view(-1, *tr.x0.shape[1:]), distinct=True)
                mid = scatter(n, r, mid, 0.0)
                hi = torch.where(scatter(n, r, adv), mid, hi)
                lo = torch.where(scatter(n, r, ~adv), mid, lo)
            new_xb = x0[ids] + hi[:, None] * seg
            new_d = (new_xb - x0[ids]).norm(dim=1)
            better = ~pending & (new_d < dist[ids])
            xb[ids] = torch.where(better[:, None], new_xb, xb[ids])
            dist[ids] = torch.where(better, new_d, dist[ids])
            t[ids] += 1
        theta, lam_out = unit(xb - x0)
        lam_out = torch.where(ok, lam_out, torch.full_like(lam_out, float("inf")))
        return SearchResult(theta, lam_out)

    def _circle(self, tr, ids, xb, dist, grad) -> tuple[torch.Tensor, torch.Tensor]:
        """Best verified point on the half circle with diameter ``x0 -> xb`` that bends toward
        the estimated normal ``grad``: ``x0 + d cos(a) (cos(a) v + sin(a) w)`` for angle
        ``a`` in ``[0, pi/2]``, ``v`` the unit direction to ``xb`` and ``w`` the part of
        ``grad`` orthogonal to it. For a flat boundary the circle crosses it exactly at the
        point of the plane closest to ``x0`` (Thales), so bisecting the crossing angle
        replaces HSJA's step-size schedule (the idea of CGBA, Reza et al., ICCV 2023)."""
        x0 = tr.flat0[ids]
        shape = tr.x0.shape[1:]
        v, d = unit(xb - x0)
        w, wn = unit(grad - (grad * v).sum(1, keepdim=True) * v)
        lo = torch.zeros_like(d)
        hi = torch.full_like(d, math.pi / 2)
        best, best_d = xb.clone(), dist.clone()
        active = wn > 1e-6
        n = ids.numel()
        for _ in range(60):
            # stop once the radius cannot shrink by more than the relative tolerance
            active &= (torch.cos(hi) < (1 - self.tol) * torch.cos(lo)) & (tr.remaining()[ids] > 0)
            r = torch.nonzero(active).squeeze(1)
            if not r.numel():
                break
            a = (lo[r] + hi[r]) / 2
            ca, sa = torch.cos(a)[:, None], torch.sin(a)[:, None]
            p = (x0[r] + d[r, None] * ca * (ca * v[r] + sa * w[r])).clamp(tr.lower, tr.upper)
            adv = tr.query(ids[r], p.view(-1, *shape), distinct=True)
            pd = (p - x0[r]).norm(dim=1)
            better = adv & (pd < best_d[r])
            a, adv_n = scatter(n, r, a, 0.0), scatter(n, r, adv)
            lo = torch.where(adv_n, a, lo)
            hi = torch.where(scatter(n, r, ~adv), a, hi)
            best[r] = torch.where(better[:, None], p, best[r])
            best_d[r] = torch.where(better, pd, best_d[r])
        return best, best_d

    def _probes(self, n: int, k: int, low: torch.Tensor, shape: tuple[int, ...], generator,
                device: torch.device | str = "cpu") -> torch.Tensor:
        """``(n, k, D)`` unit probe directions on ``device``; rows where ``low`` is set come from the subspace."""
        C, H, W = shape
        low = low.to(device)
        u = torch.empty(n, k, C * H * W, device=device)
        if bool((~low).any()):
            u[~low] = randn_on((int((~low).sum()), k, C * H * W), generator, device)
        if bool(low.any()):
            m = int(low.sum())
            h, w = max(1, -(-H // self.subspace)), max(1, -(-W // self.subspace))
            z = randn_on((m * k, C, h, w), generator, device)
            z = torch.nn.functional.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)
            u[low] = z.reshape(m, k, -1)
        return u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)

    def _grad(self, tr, ids, xb, dist, n_t, generator) -> torch.Tensor:
        """Unit estimate of the boundary normal at ``xb`` pointing into the criterion side.

        ``sum_k (phi_k - mean(phi)) u_k`` is accumulated as ``sum phi u - mean * sum u`` so
        the probes never need to be held in memory all at once."""
        n, D = xb.shape
        delta = self.gamma * dist.clamp_min(1e-6) / D**0.5  # sqrt(D) * (gamma / D^1.5) * dist
        kmax = int(n_t.max())
        s_phi_u = torch.zeros_like(xb)
        s_u = torch.zeros_like(xb)
        s_phi = torch.zeros(n, device=xb.device)
        chunk = max(1, min(kmax, MAX_ELEMS // max(1, n * D)))
        low = torch.zeros(n, dtype=torch.bool, device=xb.device)
        if self.subspace > 1:
            low[:] = True
            if self.subspace_queries is not None:
                low = tr.queries[ids] < self.subspace_queries
        for s in range(0, kmax, chunk):
            kc = min(chunk, kmax - s)
            u = self._draw(tr, ids, kc, low, generator).to(xb.device)
            use = torch.arange(s, s + kc, device=xb.device)[None, :] < n_t[:, None]  # (n, kc)
            rows = use.nonzero()
            probe = (xb[rows[:, 0]] + delta[rows[:, 0], None] * u[rows[:, 0], rows[:, 1]]).clamp(tr.lower, tr.upper)
            adv = tr.query(ids[rows[:, 0]], probe.view(-1, *tr.x0.shape[1:]))
            phi = torch.zeros(n, kc, device=xb.device)
            phi[rows[:, 0], rows[:, 1]] = torch.where(adv, 1.0, -1.0)
            u = u * use[..., None]
            s_phi_u += (phi[..., None] * u).sum(1)
            s_u += u.sum(1)
            s_phi += phi.sum(1)
        mean = s_phi / n_t.float()
        mean = torch.where(mean.abs() < 1, mean, torch.zeros_like(mean))  # all answers equal: no centring
        g, _ = unit(self._combine(tr, ids, s_phi_u - mean[:, None] * s_u, low))
        return g

    def _draw(self, tr, ids, k: int, low: torch.Tensor, generator) -> torch.Tensor:
        """``(len(ids), k, D)`` probe directions for problems ``ids`` (a hook: subclasses may
        draw them otherwise, e.g. from a prior)."""
        return self._probes(len(ids), k, low, tuple(tr.x0.shape[1:]), generator, tr.device)

    def _combine(self, tr, ids, m: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """The normal estimate (any scale) from ``m``, the centred sum of the sign-weighted
        probes (a hook: a subclass whose probes are not isotropic undoes their covariance)."""
        return m



@ESTIMATORS.register("hsja")
def hsja(n_dirs: int = 20, init_tol: float = 1e-3, **kw) -> HopSkipJump:
    """Our HopSkipJump-style search from a 20-direction BD start: far more accurate than MBD at small budgets."""
    return HopSkipJump(init=BoundaryDistance(n=n_dirs, tol=init_tol), **kw)


@ESTIMATORS.register("hsja-sub")
def hsja_sub(subspace: int = 2, subspace_queries: int | None = 1000, **kw) -> HopSkipJump:
    """``hsja`` with low-frequency probes for each pair's first 1,000 queries."""
    return hsja(subspace=subspace, subspace_queries=subspace_queries, **kw)


@ESTIMATORS.register("hsja-sub-circle")
def hsja_sub_circle(**kw) -> HopSkipJump:
    """``hsja-sub`` with the half-circle update: the most query-efficient up to 1,000 queries per pair."""
    return hsja_sub(update="circle", **kw)
