"""What every boundary search shares: the estimator contract, candidate pools of initial
directions, results, and the batched local bracket-and-bisect search.

Each estimator works on a batch of ``P`` problems held by a :class:`PairTracker`: problem
``p`` asks how far ``x0[p]`` must move (L2) before the teacher's answer meets the
criterion (``== target[p]``, or ``!= source[p]`` when untargeted). All state is kept as
``(P,)`` / ``(P, D)`` tensors and masks; every loop is bounded by the per-problem budget
and an iteration cap, so every search terminates. A problem that finds no adversarial
point keeps distance ``inf`` (reported as "failed", never silently replaced).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .tracker import PairTracker

MAX_ELEMS = 1 << 24  # cap on probe-tensor elements built at once (64 MB of float32)


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



def randn_on(shape: tuple[int, ...], generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Standard normal draws of ``shape`` on ``device`` from the stream of ``generator`` (a CPU
    generator). On the CPU they come from it directly; on another device from a generator there,
    seeded by one draw of it: sampling on the host and copying to a GPU would cost more than the
    search step that uses them. Deterministic under the seed on each device."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.randn(*shape, generator=generator)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.randn(*shape, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def unit(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = v.norm(dim=-1, keepdim=True)
    return v / n.clamp_min(1e-12), n.squeeze(-1)


class Estimator:
    """Base class: the public :meth:`__call__` validates, subclasses implement :meth:`_run`."""

    name = "estimator"
    needs_pool = False
    #: whether it can continue from given directions (``init`` / warm starts): needed by
    #: the "nearest" allocation, which refines the nearest targets of a first pass
    iterative = False

    def max_queries_per_pair(self, budget: int) -> int:
        """The most queries one pair can cost at a per-pair ``budget`` (for plans and ETAs)."""
        return budget

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


class Capped(Estimator):
    """Runs ``inner`` on at most the first ``queries`` queries of each problem, so it can
    hand over to another estimator (e.g. as the ``init`` of :class:`SignOPT`)."""

    name = "capped"

    def __init__(self, inner: Estimator, queries: int) -> None:
        if queries < 1:
            raise ValueError(f"queries must be >= 1, got {queries}")
        self.inner, self.queries = inner, int(queries)
        self.needs_pool, self.iterative = inner.needs_pool, inner.iterative

    def _run(self, tracker, pool, generator):
        with tracker.capped(self.queries):
            return self.inner(tracker, pool, generator)



def scatter(n: int, rows: torch.Tensor, values: torch.Tensor, fill: float | bool = False) -> torch.Tensor:
    """``(n, ...)`` tensor holding ``values`` at ``rows`` and ``fill`` elsewhere: lets a search update
    its state with whole masks (``torch.where``) instead of index lists, each of which would wait
    for the device to learn its length."""
    out = values.new_full((n, *values.shape[1:]), fill)
    out[rows] = values
    return out


def local_search(tr: PairTracker, ids: torch.Tensor, theta: torch.Tensor, cap: torch.Tensor, tol: torch.Tensor,
                 shrink: float = 0.99, max_steps: int = 400) -> torch.Tensor:
    """``g(theta)`` near ``cap`` for problems ``ids``: ``inf`` if the point at ``cap`` does not
    meet the criterion (then ``g > cap``: no improvement), else bracket downwards in
    ``shrink`` steps and bisect to ``tol``. Returns ``(n,)``; stops early (returning the
    verified upper end) when a problem's budget runs out."""
    n = ids.numel()
    x0 = tr.flat0[ids]
    shape = tr.x0.shape[1:]
    hi = torch.full((n,), float("inf"), device=theta.device)
    r = torch.nonzero(tr.remaining()[ids] > 0).squeeze(1)
    if not r.numel():
        return hi
    adv = scatter(n, r, tr.query(ids[r], (x0[r] + cap[r, None] * theta[r]).view(-1, *shape)))
    hi = torch.where(adv, cap, hi)
    lo = hi * shrink
    # bracket: move lo down while it is still adversarial
    moving = torch.isfinite(hi)
    for _ in range(max_steps):
        moving &= tr.remaining()[ids] > 0
        r = torch.nonzero(moving).squeeze(1)
        if not r.numel():
            break
        adv = scatter(n, r, tr.query(ids[r], (x0[r] + lo[r, None] * theta[r]).view(-1, *shape)))
        hi = torch.where(adv, lo, hi)
        lo = torch.where(adv, lo * shrink, lo)
        moving &= adv
    active = torch.isfinite(hi) & (hi - lo > tol)
    for _ in range(64):
        active &= tr.remaining()[ids] > 0
        r = torch.nonzero(active).squeeze(1)
        if not r.numel():
            break
        mid = (lo[r] + hi[r]) / 2
        adv = tr.query(ids[r], (x0[r] + mid[:, None] * theta[r]).view(-1, *shape))
        mid = scatter(n, r, mid, 0.0)
        hi = torch.where(scatter(n, r, adv), mid, hi)
        lo = torch.where(scatter(n, r, ~adv), mid, lo)
        active &= hi - lo > tol
    return hi
