"""Third-party decision-based targeted L2 attacks as boundary-distance peers.

Optional benchmark dependencies (not package dependencies)::

    pip install foolbox==3.3.4 adversarial-robustness-toolbox==1.20.1

Both adapters take the same inputs as :mod:`boundary`'s peers: ``model`` (a torch module in
eval mode returning logits for (N, C, H, W) inputs in ``bounds``; its label is the argmax),
``x`` (P, C, H, W) originals, ``target`` (P,) target classes (never the teacher's label of
``x``), ``start`` (P, C, H, W) starting images the teacher labels as ``target`` and
``budgets`` (increasing per-pair query checkpoints). They return a (P, len(budgets)) float32
tensor on ``x.device``: for each pair and checkpoint ``b`` the smallest ``||x_adv - x||_2``
over every point the teacher labelled ``target`` among the first ``b`` model queries (rows)
made for that pair, the start counting as a free adversarial at query 0 (so every value is
<= ``||start - x||``); ``inf`` only if that distance is not finite.

Query accounting (exact, per pair): the teacher is wrapped in :class:`_QueryLog`, which
labels every row the library sends, attributes it to its pair, measures its L2 distance
to that pair's original on the row that was actually evaluated (after the libraries'
own clipping) and keeps the running best target-labelled one. Every row counts, including
the libraries' own checks (foolbox: the is-adversarial check of ``starting_points`` and
the ``assert ep.all(is_adversarial(...))`` lines; ART: the prediction of the original in
``generate``, the label check of ``x_init`` and the final success check). When a pair
has used ``max(budgets)`` rows the wrapper raises a private exception that the adapter
catches; that ends the attack on that pair (the libraries' own iteration limits are set
so high that they do not end it first). Rows past the budget in the same call are
evaluated but ignored. A run never queries the model outside an attack, except once on
``x[:1]`` (uncounted) to learn the number of classes that ART's wrapper needs.

* ``foolbox-hsja``: ``foolbox.attacks.HopSkipJumpAttack`` (foolbox 3.3.4), run through
  ``attack.run(fmodel, x, TargetedMisclassification(target), starting_points=start)``.
  Library defaults (constraint="l2", initial_gradient_eval_steps=100,
  max_gradient_eval_steps=10000, stepsize_search="geometric_progression", gamma=1.0)
  except ``steps`` (default 64), which is raised to effectively unlimited so the query
  budget, not the step count, ends the run (``steps`` only bounds the outer loop; the
  per-step schedule depends on the step index, not on ``steps``). One pair per run by
  default (``batch_size=1``): in a batch every model call holds one row per pair, in
  order, so attribution is exact, but the geometric step-size loop repeats until *every*
  pair of the batch succeeds, re-querying pairs that already succeeded, so a batched
  pair is charged for queries a single-pair run would not make (``batch_size>1`` is
  faster in wall time and still exact, just slightly pessimistic for foolbox).
* ``art-signopt``: ``art.attacks.evasion.SignOPTAttack`` (ART 1.20.1) on a
  ``PyTorchClassifier(clip_values=bounds)``, one pair per ``generate`` call with
  ``x_init=start[i:i+1]`` (ART's targeted Sign-OPT takes its starting direction from the
  ``x_init`` pool; a pool of one is exactly ``start``). Library defaults (epsilon=0.001,
  num_trial=100, k=200, alpha=0.2, beta=0.001, batch_size=64) except max_iter=5000 and
  query_limit=max(40000, max(budgets)+1), the values ART's docstring recommends for
  targeted attacks (its defaults are for untargeted ones), raised if a budget needs it.
  ``fix_targeted_init=True`` (the default) repairs one line of ART 1.20.1: its targeted
  initial binary search (``SignOPTAttack._fine_grained_binary_search``) tests the label
  against the *original* class ``y_0`` and moves the wrong bound (``not _is_label(...,
  y_0)`` -> ``lbd_lo = lbd_mid``), so it either keeps the full start distance or
  collapses to a non-adversarial ~1e-5 radius from which the later local searches cannot
  recover; the override is the authors' reference rule (``label != target`` ->
  ``lbd_lo``). Pass ``fix_targeted_init=False`` to run ART exactly as shipped.

Seeds: every pair (foolbox: every batch) gets its own seed derived from ``(seed, pair
index)`` for torch (foolbox draws its gradient-estimation noise with torch) and numpy
(ART draws with ``np.random``), so a pair's result does not depend on which pairs ran
before it. The global RNG states are restored afterwards.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["PEERS", "art_signopt", "foolbox_hsja"]

_FOOLBOX_HINT = "foolbox is required for the foolbox-hsja peer: pip install foolbox==3.3.4"
_ART_HINT = "ART is required for the art-signopt peer: pip install adversarial-robustness-toolbox==1.20.1"


class _BudgetExhausted(Exception):
    """Raised by the counting wrapper once the current pair(s) used the full budget."""


class _QueryLog(torch.nn.Module):
    """Counting wrapper: labels every queried row, attributes it to its pair and keeps, per
    pair, the improvements ``(query index, distance[, point])`` of target-labelled rows."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, start: torch.Tensor,
                 limit: int, keep_points: bool = False):
        super().__init__()
        self.model = model
        self.x = x.detach().flatten(1).double()
        self.target = target.detach().long().to(x.device)
        self.limit = int(limit)
        self.keep_points = keep_points
        self.count = [0] * len(x)
        d0 = (start.detach().flatten(1).double() - self.x).norm(dim=1).tolist()
        # improvements per pair: (query index, distance); the start is free (index 0)
        self.steps: list[list[tuple[int, float]]] = [[(0, d)] for d in d0]
        self.points: list[list[torch.Tensor]] = [[s.detach().clone()] for s in start] if keep_points else []
        self.active: list[int] | None = None
        self.eval()

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        active = self.active
        if active is None:
            raise RuntimeError("peer attack queried the model outside a counted run")
        with torch.no_grad():
            logits = self.model(inp)
        n = len(inp)
        if len(active) == 1:
            owners = active * n
        elif n == len(active):
            owners = active
        else:
            raise RuntimeError(f"cannot attribute a call of {n} rows to a batch of {len(active)} pairs")
        own = torch.as_tensor(owners, device=self.x.device)
        rows = inp.detach().to(self.x.device)
        labels = logits.detach().argmax(1).to(self.x.device)
        hit = (labels == self.target[own]).tolist()
        dist = (rows.flatten(1).double() - self.x[own]).norm(dim=1).tolist() if any(hit) else None
        for j, p in enumerate(owners):
            self.count[p] += 1
            q = self.count[p]
            if hit[j] and q <= self.limit and dist[j] < self.steps[p][-1][1]:
                self.steps[p].append((q, dist[j]))
                if self.keep_points:
                    self.points[p].append(rows[j].clone())
        if any(self.count[p] >= self.limit for p in active):
            raise _BudgetExhausted
        return logits

    def distances(self, budgets: Sequence[int]) -> torch.Tensor:
        out = torch.full((len(self.steps), len(budgets)), math.inf, dtype=torch.float32)
        for p, st in enumerate(self.steps):
            for k, b in enumerate(budgets):
                best = min((d for q, d in st if q <= b), default=math.inf)
                out[p, k] = best if math.isfinite(best) else math.inf
        return out.to(self.x.device)

    def best_points(self, budget: int) -> list[tuple[int, float, torch.Tensor]]:
        """Per pair, ``(query index, distance, point)`` of the best target-labelled row within
        ``budget`` (needs ``keep_points=True``)."""
        out = []
        for st, pts in zip(self.steps, self.points):
            k = max(i for i, (q, _) in enumerate(st) if q <= budget)
            out.append((st[k][0], st[k][1], pts[k]))
        return out


def _check(x, target, start, budgets) -> tuple[int, ...]:
    budgets = tuple(int(b) for b in budgets)
    if not budgets or any(b <= 0 for b in budgets) or list(budgets) != sorted(budgets):
        raise ValueError(f"budgets must be positive and increasing, got {budgets}")
    if x.ndim != 4 or start.shape != x.shape or target.shape != (len(x),):
        raise ValueError(f"expected x and start (P, C, H, W) and target (P,), got "
                         f"{tuple(x.shape)}, {tuple(start.shape)}, {tuple(target.shape)}")
    return budgets


def _pair_seed(seed: int, *key: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *key]).generate_state(1)[0])


class _Seeded:
    """Seeds torch and numpy for one pair/batch; restores both global states on exit."""

    def __enter__(self):
        self._torch = torch.random.get_rng_state()
        self._np = np.random.get_state()
        return self

    def seed(self, s: int) -> None:
        torch.manual_seed(s)
        np.random.seed(s)

    def __exit__(self, *exc):
        torch.random.set_rng_state(self._torch)
        np.random.set_state(self._np)
        return False


def _model_device(model: torch.nn.Module, x: torch.Tensor) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else x.device


def _foolbox_log(model, x, target, start, budgets, seed=0, bounds=(0.0, 1.0), *, batch_size: int = 1,
                 keep_points: bool = False) -> _QueryLog:
    try:
        import foolbox as fb
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(_FOOLBOX_HINT) from e
    budgets = _check(x, target, start, budgets)
    dev = _model_device(model, x)
    x, start, target = x.detach().float().to(dev), start.detach().float().to(dev), target.detach().long().to(dev)
    log = _QueryLog(model, x, target, start, max(budgets), keep_points)
    fmodel = fb.PyTorchModel(log, bounds=tuple(float(b) for b in bounds), device=dev)
    # library defaults except `steps` (see the module docstring)
    attack = fb.attacks.HopSkipJumpAttack(steps=2**62, constraint="l2")
    step = max(1, int(batch_size))
    groups = [list(range(lo, min(lo + step, len(x)))) for lo in range(0, len(x), step)]
    return _drive(log, groups, seed, lambda idx: attack.run(
        fmodel, x[idx], fb.criteria.TargetedMisclassification(target[idx]), starting_points=start[idx]))


def _drive(log, groups: list[list[int]], seed: int, attack_group) -> "_QueryLog":
    """Run ``attack_group(idx)`` on each group of pair indices, seeded per group, until the
    group's budget ends it (the log raises :class:`_BudgetExhausted`) or the attack returns."""
    with _Seeded() as rng:
        for idx in groups:
            rng.seed(_pair_seed(seed, idx[0], len(idx)))
            log.active = idx
            try:
                attack_group(idx)
            except _BudgetExhausted:
                pass
            finally:
                log.active = None
    return log


def foolbox_hsja(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, start: torch.Tensor,
                 budgets: tuple[int, ...], seed: int = 0, bounds=(0.0, 1.0), *, batch_size: int = 1) -> torch.Tensor:
    """foolbox 3.3.4 HopSkipJumpAttack (targeted, L2) from ``start``; (P, len(budgets)) best
    verified distances. ``batch_size`` pairs per foolbox run (1: exact single-pair cost)."""
    return _foolbox_log(model, x, target, start, budgets, seed, bounds, batch_size=batch_size).distances(budgets)


def _signopt_class(fix_targeted_init: bool):
    try:
        from art.attacks.evasion import SignOPTAttack
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(_ART_HINT) from e
    if not fix_targeted_init:
        return SignOPTAttack

    class _FixedSignOPT(SignOPTAttack):
        """ART's Sign-OPT with the targeted initial binary search testing ``label == target``
        (ART 1.20.1 tests ``label == y_0`` there); everything else unchanged."""

        def _fine_grained_binary_search(self, x_0, y_0, theta, initial_lbd, current_best, target=None):
            if not self.targeted:
                return super()._fine_grained_binary_search(x_0, y_0, theta, initial_lbd, current_best, target)
            tolerate = 1e-5  # ART's targeted tolerance
            nquery = 0
            if initial_lbd > current_best:
                nquery += 1
                if not self._is_label(x_0 + current_best * theta, target):
                    return float("inf"), nquery
                lbd = current_best
            else:
                lbd = initial_lbd
            lbd_hi, lbd_lo = lbd, 0.0
            while (lbd_hi - lbd_lo) > tolerate:
                lbd_mid = (lbd_lo + lbd_hi) / 2.0
                nquery += 1
                if self._is_label(x_0 + lbd_mid * theta, target):
                    lbd_hi = lbd_mid
                else:
                    lbd_lo = lbd_mid
            return lbd_hi, nquery

    return _FixedSignOPT


def _art_log(model, x, target, start, budgets, seed=0, bounds=(0.0, 1.0), *, fix_targeted_init: bool = True,
             keep_points: bool = False) -> _QueryLog:
    try:
        from art.estimators.classification import PyTorchClassifier
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(_ART_HINT) from e
    attack_cls = _signopt_class(fix_targeted_init)
    budgets = _check(x, target, start, budgets)
    dev = _model_device(model, x)
    x, start, target = x.detach().float().to(dev), start.detach().float().to(dev), target.detach().long().to(dev)
    with torch.no_grad():
        nb_classes = int(model(x[:1]).shape[1])  # uncounted: only the output size
    log = _QueryLog(model, x, target, start, max(budgets), keep_points)
    clf = PyTorchClassifier(model=log, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                            nb_classes=nb_classes, clip_values=(float(bounds[0]), float(bounds[1])),
                            device_type="gpu" if dev.type == "cuda" else "cpu")
    # defaults except the targeted recommendations of ART's docstring (see the module docstring)
    attack = attack_cls(clf, targeted=True, max_iter=5000, query_limit=max(40000, max(budgets) + 1), verbose=False)
    xn, sn, tn = x.cpu().numpy(), start.cpu().numpy(), target.cpu().numpy()
    return _drive(log, [[i] for i in range(len(x))], seed,
                  lambda idx: attack.generate(xn[idx], y=tn[idx], x_init=sn[idx]))


def art_signopt(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, start: torch.Tensor,
                budgets: tuple[int, ...], seed: int = 0, bounds=(0.0, 1.0), *,
                fix_targeted_init: bool = True) -> torch.Tensor:
    """ART 1.20.1 SignOPTAttack (targeted) from ``x_init=start``, one pair at a time;
    (P, len(budgets)) best verified distances."""
    return _art_log(model, x, target, start, budgets, seed, bounds,
                    fix_targeted_init=fix_targeted_init).distances(budgets)


PEERS = {"foolbox-hsja": foolbox_hsja, "art-signopt": art_signopt}
