"""Boundary-distance estimators (sample robustness, arXiv 2106.03310 section 3.2).

Each estimator works on a batch of ``P`` problems held by a :class:`PairTracker`: problem
``p`` asks how far ``x0[p]`` must move (L2) before the teacher's answer meets the
criterion (``== target[p]``, or ``!= source[p]`` when untargeted). All state is kept as
``(P,)`` / ``(P, D)`` tensors and masks; every loop is bounded by the per-problem budget
and an iteration cap, so every search terminates. A problem that finds no adversarial
point keeps distance ``inf`` (reported as "failed", never silently replaced).

Estimators:

* :class:`SampleDistance` (SD, 0 queries): distance to the nearest of ``n`` pool samples
  of the target class.
* :class:`BoundaryDistance` (BD): bisection along the directions to ``n`` pool samples of
  the target class (or random directions), skipping directions that cannot beat the best.
* :class:`SignOPT` (MBD): BD initialisation refined by the Sign-OPT zeroth-order
  optimiser of Cheng et al. (arXiv 1909.10773), with per-problem step sizes.
* :class:`HopSkipJump`: a targeted HopSkipJump-style search (boundary-normal estimates at
  the boundary), optionally with low-frequency probes and the half-circle update.
* :class:`Capped`: any estimator limited to each problem's first ``q`` queries, so it can
  be the initialisation of another (the ``hybrid`` preset: HSJA, then Sign-OPT).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..registry import Registry
from .tracker import UNTARGETED, PairTracker

ESTIMATORS: Registry["Estimator"] = Registry("estimator")

_MAX_ELEMS = 1 << 24  # cap on probe-tensor elements built at once (64 MB of float32)


@dataclass
class SearchResult:
    """Best direction found per problem: ``theta`` ``(P, D)`` unit vectors, ``lam`` ``(P,)``
    step along it that reaches the criterion (``inf`` where none was found)."""

    theta: torch.Tensor
    lam: torch.Tensor


class CandidatePool:
    """Images grouped by class, from which initial search directions are drawn.

    Args:
        x: ``(M, C, H, W)`` images (training samples in DB3KD, pseudo samples in ZSDB3KD).
        y: ``(M,)`` their classes.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"pool has {x.shape[0]} images but {y.shape[0]} labels")
        self.flat = x.reshape(x.shape[0], -1)
        self.y = y.long().to(x.device)
        self.by_class = {int(c): torch.nonzero(self.y == c).squeeze(1) for c in torch.unique(self.y)}

    def draw(self, target: torch.Tensor, m: int, generator: torch.Generator) -> torch.Tensor:
        """``(P, m)`` pool indices of class ``target[p]`` drawn without replacement where
        possible (with replacement when the class has fewer than ``m``); ``-1`` where the
        pool has no sample of that class."""
        P = target.numel()
        out = torch.full((P, m), -1, dtype=torch.long, device=self.flat.device)
        for c in torch.unique(target).tolist():
            rows = torch.nonzero(target == c).squeeze(1)
            members = self.by_class.get(int(c))
            if members is None or members.numel() == 0:
                continue
            n = members.numel()
            if n >= m:
                keys = torch.rand(rows.numel(), n, generator=generator, device="cpu")
                pick = keys.topk(m, dim=1).indices.to(members.device)
            else:
                pick = torch.randint(n, (rows.numel(), m), generator=generator, device="cpu").to(members.device)
            out[rows] = members[pick]
        return out


def _unit(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = v.norm(dim=-1, keepdim=True)
    return v / n.clamp_min(1e-12), n.squeeze(-1)


class Estimator:
    """Base class: the public :meth:`__call__` validates, subclasses implement :meth:`_run`."""

    name = "estimator"
    needs_pool = False

    def __call__(self, tracker: PairTracker, pool: CandidatePool | None, generator: torch.Generator) -> SearchResult:
        if self.needs_pool and pool is None:
            raise ValueError(f"estimator {self.name!r} needs a candidate pool of target-class samples")
        if pool is not None and pool.flat.shape[1] != tracker.flat0.shape[1]:
            raise ValueError(
                f"pool images have {pool.flat.shape[1]} values, samples have {tracker.flat0.shape[1]}"
            )
        return self._run(tracker, pool, generator)

    def _run(self, tracker: PairTracker, pool: CandidatePool | None, generator: torch.Generator) -> SearchResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


@ESTIMATORS.register("sd")
class SampleDistance(Estimator):
    """SD: L2 distance to the nearest of ``n`` random pool samples of the target class (0 queries)."""

    name = "sd"
    needs_pool = True

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
            u, d = _unit(diff)
            better = ok & (d > 0) & (d < best)
            best = torch.where(better, d, best)
            theta = torch.where(better[:, None], u, theta)
        tracker.at[:] = best[:, None]  # known without a single query
        return SearchResult(theta, best)


@ESTIMATORS.register("bd")
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
                w, _ = _unit(warm[ids].to(dev))
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
                    full = torch.randn(P, D, generator=g).to(dev)
                    out[rows] = full[ids[rows]]
                theta, _ = _unit(out)
                return theta, torch.full((ids.numel(),), max_len, device=dev)
            c = cand[ids, jj]
            theta, dist = _unit(pool.flat[c.clamp_min(0)] - tr.flat0[ids])
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
        for _ in range(self.n * 80 + 10):  # hard cap; the budget normally ends it first
            live = (j < self.n) & (tr.remaining() > 0)
            reload &= live
            if bool(reload.any()):
                ids = torch.nonzero(reload).squeeze(1)
                theta[ids], length[ids] = load(ids, j[ids])
                reload[:] = False
            # directions with no usable end point are skipped without a query
            skip = live & ~bisecting & ~torch.isfinite(length)
            if bool(skip.any()):
                j[skip] += 1
                reload |= skip
                continue
            if not bool(live.any()):
                break
            ids = torch.nonzero(live).squeeze(1)
            checking = ~bisecting[ids]
            lam = torch.where(checking, torch.minimum(best_lam[ids], length[ids]), (lo[ids] + hi[ids]) / 2)
            adv = tr.query(ids, tr.x0[ids] + (lam[:, None] * theta[ids]).view_as(tr.x0[ids]))
            # check step: adversarial -> start bisecting [0, lam]; else next direction
            start = checking & adv
            nxt = checking & ~adv
            lo[ids[start]] = 0.0
            hi[ids[start]] = lam[start]
            bisecting[ids[start]] = True
            # bisection step
            bis = ~checking
            hi[ids[bis & adv]] = lam[bis & adv]
            lo[ids[bis & ~adv]] = lam[bis & ~adv]
            fin_rows = ids[bisecting[ids] & ((hi[ids] - lo[ids]) <= self.tol)]
            if fin_rows.numel():
                better = hi[fin_rows] < best_lam[fin_rows]
                upd = fin_rows[better & bisecting[fin_rows]]
                best_lam[upd] = hi[upd]
                best_theta[upd] = theta[upd]
                bisecting[fin_rows] = False
            done_dir = torch.cat([ids[nxt], fin_rows])
            j[done_dir] += 1
            reload[done_dir] = True
        # a bisection cut short by the budget still holds a verified adversarial hi
        cut = bisecting & (hi < best_lam)
        best_lam[cut] = hi[cut]
        best_theta[cut] = theta[cut]
        return SearchResult(best_theta, best_lam)


class Capped(Estimator):
    """Runs ``inner`` on at most the first ``queries`` queries of each problem, so it can
    hand over to another estimator (e.g. as the ``init`` of :class:`SignOPT`)."""

    name = "capped"

    def __init__(self, inner: Estimator, queries: int) -> None:
        if queries < 1:
            raise ValueError(f"queries must be >= 1, got {queries}")
        self.inner, self.queries = inner, int(queries)
        self.needs_pool = inner.needs_pool

    def _run(self, tracker, pool, generator):
        with tracker.capped(self.queries):
            return self.inner(tracker, pool, generator)


@ESTIMATORS.register("signopt")
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
        chunk = max(1, min(self.k, _MAX_ELEMS // max(1, n * D)))
        for s in range(0, self.k, chunk):
            kc = min(chunk, self.k - s)
            u = torch.randn(n, kc, D, generator=generator).to(theta.device)
            u = u / u.norm(dim=2, keepdim=True) * beta[:, None, None]
            probe, _ = _unit(theta[:, None, :] + u)
            x = tr.flat0[ids][:, None, :] + g[:, None, None] * probe
            adv = tr.query(ids.repeat_interleave(kc), x.reshape(n * kc, *tr.x0.shape[1:]))
            sign = torch.where(adv, -1.0, 1.0).view(n, kc, 1)
            grad += (sign * u).sum(dim=1)
        return grad

    def _line_search(self, tr, ids, theta, g, grad, alpha, beta):
        best_theta, best_g = theta.clone(), g.clone()
        a = alpha.clone()
        tol = beta / 500
        grow = torch.ones_like(g, dtype=torch.bool)
        for _ in range(self.ls_steps):
            grow &= tr.remaining()[ids] > 0
            if not bool(grow.any()):
                break
            r = torch.nonzero(grow).squeeze(1)
            cand, _ = _unit(theta[r] - a[r, None] * grad[r])
            cg = local_search(tr, ids[r], cand, best_g[r], tol[r])
            imp = cg < best_g[r]
            best_theta[r[imp]] = cand[imp]
            best_g[r[imp]] = cg[imp]
            a[r[imp]] *= 2
            grow[r[~imp]] = False
        a = torch.where(best_g < g, a / 2, a)  # last successful step
        shrink = best_g >= g
        for _ in range(self.ls_steps):
            shrink &= tr.remaining()[ids] > 0
            if not bool(shrink.any()):
                break
            r = torch.nonzero(shrink).squeeze(1)
            a[r] *= 0.25
            cand, _ = _unit(theta[r] - a[r, None] * grad[r])
            cg = local_search(tr, ids[r], cand, g[r], tol[r])
            imp = cg < g[r]
            best_theta[r[imp]] = cand[imp]
            best_g[r[imp]] = cg[imp]
            shrink[r[imp]] = False
        return best_theta, best_g, a


def local_search(tr: PairTracker, ids: torch.Tensor, theta: torch.Tensor, cap: torch.Tensor, tol: torch.Tensor,
                 shrink: float = 0.99, max_steps: int = 400) -> torch.Tensor:
    """``g(theta)`` near ``cap`` for problems ``ids``: ``inf`` if the point at ``cap`` does not
    meet the criterion (then ``g > cap``: no improvement), else bracket downwards in
    ``shrink`` steps and bisect to ``tol``. Returns ``(n,)``; stops early (returning the
    verified upper end) when a problem's budget runs out."""
    n = ids.numel()
    x0 = tr.flat0[ids]
    shape = tr.x0.shape[1:]
    out = torch.full((n,), float("inf"), device=theta.device)
    ok = tr.remaining()[ids] > 0
    if not bool(ok.any()):
        return out
    r = torch.nonzero(ok).squeeze(1)
    adv = tr.query(ids[r], (x0[r] + cap[r, None] * theta[r]).view(-1, *shape))
    hi = torch.full((n,), float("inf"), device=theta.device)
    hi[r[adv]] = cap[r[adv]]
    lo = hi * shrink
    # bracket: move lo down while it is still adversarial
    moving = torch.isfinite(hi)
    for _ in range(max_steps):
        moving &= tr.remaining()[ids] > 0
        if not bool(moving.any()):
            break
        r = torch.nonzero(moving).squeeze(1)
        adv = tr.query(ids[r], (x0[r] + lo[r, None] * theta[r]).view(-1, *shape))
        hi[r[adv]] = lo[r[adv]]
        lo[r[adv]] *= shrink
        moving[r[~adv]] = False
    active = torch.isfinite(hi) & (hi - lo > tol)
    for _ in range(64):
        active &= tr.remaining()[ids] > 0
        if not bool(active.any()):
            break
        r = torch.nonzero(active).squeeze(1)
        mid = (lo[r] + hi[r]) / 2
        adv = tr.query(ids[r], (x0[r] + mid[:, None] * theta[r]).view(-1, *shape))
        hi[r[adv]] = mid[adv]
        lo[r[~adv]] = mid[~adv]
        active &= hi - lo > tol
    return hi


@ESTIMATORS.register("hsja")
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
            eps = dist[ids] / t[ids].sqrt()
            cand = xb[ids].clone()
            pending = torch.ones(ids.numel(), dtype=torch.bool, device=dev)
            for _ in range(self.step_tries):
                pending &= tr.remaining()[ids] > 1
                if not bool(pending.any()):
                    break
                r = torch.nonzero(pending).squeeze(1)
                trial = (xb[ids[r]] + eps[r, None] * grad[r]).clamp(tr.lower, tr.upper)
                adv = tr.query(ids[r], trial.view(-1, *tr.x0.shape[1:]))
                cand[r[adv]] = trial[adv]
                pending[r[adv]] = False
                eps[r[~adv]] /= 2
            # bisect on the segment x0 -> cand (cand meets the criterion; x0 does not)
            lo = torch.zeros(ids.numel(), device=dev)
            hi = torch.ones(ids.numel(), device=dev)
            seg = cand - x0[ids]
            active = ~pending
            for _ in range(40):
                active &= (hi - lo > self.tol) & (tr.remaining()[ids] > 0)
                if not bool(active.any()):
                    break
                r = torch.nonzero(active).squeeze(1)
                mid = (lo[r] + hi[r]) / 2
                adv = tr.query(ids[r], (x0[ids[r]] + mid[:, None] * seg[r]).view(-1, *tr.x0.shape[1:]))
                hi[r[adv]] = mid[adv]
                lo[r[~adv]] = mid[~adv]
            new_xb = x0[ids] + hi[:, None] * seg
            new_d = (new_xb - x0[ids]).norm(dim=1)
            better = ~pending & (new_d < dist[ids])
            xb[ids[better]] = new_xb[better]
            dist[ids[better]] = new_d[better]
            t[ids] += 1
        theta, lam_out = _unit(xb - x0)
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
        v, d = _unit(xb - x0)
        w, wn = _unit(grad - (grad * v).sum(1, keepdim=True) * v)
        lo = torch.zeros_like(d)
        hi = torch.full_like(d, math.pi / 2)
        best, best_d = xb.clone(), dist.clone()
        active = wn > 1e-6
        for _ in range(60):
            # stop once the radius cannot shrink by more than the relative tolerance
            active &= (torch.cos(hi) < (1 - self.tol) * torch.cos(lo)) & (tr.remaining()[ids] > 0)
            if not bool(active.any()):
                break
            r = torch.nonzero(active).squeeze(1)
            a = (lo[r] + hi[r]) / 2
            ca, sa = torch.cos(a)[:, None], torch.sin(a)[:, None]
            p = (x0[r] + d[r, None] * ca * (ca * v[r] + sa * w[r])).clamp(tr.lower, tr.upper)
            adv = tr.query(ids[r], p.view(-1, *shape))
            lo[r[adv]] = a[adv]
            hi[r[~adv]] = a[~adv]
            pd = (p - x0[r]).norm(dim=1)
            better = adv & (pd < best_d[r])
            best[r[better]] = p[better]
            best_d[r[better]] = pd[better]
        return best, best_d

    def _probes(self, n: int, k: int, low: torch.Tensor, shape: tuple[int, ...], generator) -> torch.Tensor:
        """``(n, k, D)`` unit probe directions; rows where ``low`` is set come from the subspace."""
        C, H, W = shape
        low = low.cpu()
        u = torch.empty(n, k, C * H * W)
        if bool((~low).any()):
            u[~low] = torch.randn(int((~low).sum()), k, C * H * W, generator=generator)
        if bool(low.any()):
            m = int(low.sum())
            h, w = max(1, -(-H // self.subspace)), max(1, -(-W // self.subspace))
            z = torch.randn(m * k, C, h, w, generator=generator)
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
        chunk = max(1, min(kmax, _MAX_ELEMS // max(1, n * D)))
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
        g, _ = _unit(self._combine(tr, ids, s_phi_u - mean[:, None] * s_u, low))
        return g

    def _draw(self, tr, ids, k: int, low: torch.Tensor, generator) -> torch.Tensor:
        """``(len(ids), k, D)`` probe directions for problems ``ids`` (a hook: subclasses may
        draw them otherwise, e.g. from a prior)."""
        return self._probes(len(ids), k, low, tuple(tr.x0.shape[1:]), generator)

    def _combine(self, tr, ids, m: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """The normal estimate (any scale) from ``m``, the centred sum of the sign-weighted
        probes (a hook: a subclass whose probes are not isotropic undoes their covariance)."""
        return m
