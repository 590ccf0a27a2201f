"""Why label-only distances converge slowly: white-box diagnostics for one teacher.

    python benchmarks/limits.py --teacher T.safetensors [--samples 10] [--cache runs/benchmark-cache]

Uses what a black-box attacker does not have (the teacher's gradients) to explain the
numbers of ``boundary.py``, on the first ``--samples`` of its samples:

1. **How good is the reference?** A white-box minimal-L2 targeted attack on the teacher
   (in the style of decoupled direction and norm), as a ratio to the paper-faithful MBD at
   20k queries per pair (read from the benchmark cache, computed there if missing).
2. **Is the optimum low-dimensional?** The share of the white-box perturbation's energy in
   the low-frequency subspaces that ``hsja-sub`` probes (bilinear 1/2 and 1/4 resolution)
   and in the top principal components of the training images.
3. **How good is each normal estimate?** For ``hsja-sub-circle``, the cosine between each
   iteration's estimated boundary normal and the teacher's true one (the gradient of the
   target's logit margin) at the same point, the cosine between consecutive true normals,
   and the cosine of the current direction ``x_b - x0`` with the normal (1 at a local
   optimum), per 250-query bucket. With ``n`` sign probes in ``D`` dimensions the expected
   cosine of the estimate is about ``sqrt(2 n / (pi D))`` (in the 1/2-resolution phase,
   ``D`` is the subspace's and the normal's share in it caps the cosine further).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import boundary  # noqa: E402  (the benchmark's sample choice and cache)

from zsdb3kd.data import load_dataset  # noqa: E402
from zsdb3kd.oracle import load_oracle  # noqa: E402
from zsdb3kd.robustness import CandidatePool, RobustnessSettings, compute_robustness, create_estimator  # noqa: E402
from zsdb3kd.robustness import HopSkipJump  # noqa: E402
from zsdb3kd.weights import file_sha256, load_weights  # noqa: E402


def margin_grad(model, x: torch.Tensor, target: torch.Tensor, shape) -> torch.Tensor:
    """Unit gradients of ``logit_t - max_{j != t} logit_j`` at flat points ``x``."""
    x = x.detach().clone().requires_grad_(True)
    z = model(x.view(-1, *shape))
    zt = z.gather(1, target[:, None]).squeeze(1)
    zo = z.scatter(1, target[:, None], float("-inf")).max(1).values
    (zt - zo).sum().backward()
    return F.normalize(x.grad, dim=1)


def whitebox_min_l2(model, x0: torch.Tensor, target: torch.Tensor, steps: int = 300, gamma: float = 0.05):
    """Batched targeted minimal-L2 search with the model's gradients: a normalised gradient
    step on the cross-entropy, then the perturbation is rescaled to a norm that shrinks
    while the point is adversarial and grows while it is not. Returns the smallest
    adversarial norm seen per problem."""
    delta = torch.zeros_like(x0, requires_grad=True)
    eps = torch.ones(len(x0))
    best = torch.full((len(x0),), float("inf"))
    best_delta = torch.zeros_like(x0)
    for i in range(steps):
        step = 0.5 * (1 + math.cos(math.pi * i / steps)) + 0.01
        z = model((x0 + delta).clamp(0, 1))
        adv = z.argmax(1) == target
        norm = delta.detach().flatten(1).norm(dim=1)
        better = adv & (norm < best)
        best[better], best_delta[better] = norm[better], delta.detach()[better]
        g, = torch.autograd.grad(F.cross_entropy(z, target, reduction="sum"), delta)
        with torch.no_grad():
            delta -= step * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            eps = torch.where(adv, eps * (1 - gamma), eps * (1 + gamma))
            delta *= (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)
            delta.copy_((x0 + delta).clamp(0, 1) - x0)
    return best, best_delta


def energy_in(delta: torch.Tensor, basis: torch.Tensor) -> float:
    """Median share of ``||delta||^2`` in the span of the orthonormal rows of ``basis``."""
    p = delta @ basis.T
    return float((p.norm(dim=1) ** 2 / delta.norm(dim=1) ** 2).median())


def bilinear_basis(shape, s: int) -> torch.Tensor:
    C, H, W = shape
    h, w = -(-H // s), -(-W // s)
    e = torch.eye(C * h * w).view(-1, C, h, w)
    b = F.interpolate(e, size=(H, W), mode="bilinear", align_corners=False).flatten(1)
    return torch.linalg.qr(b.T).Q.T


class Recording(HopSkipJump):
    """``hsja-sub-circle`` that records its normal estimates against the true normals."""

    def __init__(self, model, **kw):
        super().__init__(**kw)
        self.model, self.rows, self.prev = model, defaultdict(list), {}

    def _grad(self, tr, ids, xb, dist, n_t, generator):
        g = super()._grad(tr, ids, xb, dist, n_t, generator)
        true = margin_grad(self.model, xb, tr.target[ids], tuple(tr.x0.shape[1:]))
        v = F.normalize(xb - tr.flat0[ids], dim=1)
        for k, i in enumerate(ids.tolist()):
            prev = float(self.prev[i] @ true[k]) if i in self.prev else float("nan")
            self.prev[i] = true[k]
            self.rows[int(tr.queries[i]) // 250].append(
                (float(g[k] @ true[k]), float(v[k] @ true[k]), prev, float(n_t[k])))
        return g


def benchmark_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every white-box study of a ``boundary.py`` run shares."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--samples", type=int, default=10, help="study the first this many benchmark samples")
    ap.add_argument("--benchmark-samples", type=int, default=50, help="the boundary.py run whose reference to use")
    ap.add_argument("--reference-budget", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="runs/benchmark-cache")
    return ap


def load_benchmark(args):
    """The first ``--samples`` of the ``boundary.py`` samples, their reference distances
    (computed into the cache if missing), the candidate pool, the training set and the
    teacher as a white-box model (frozen). Returns ``x, d_ref, labels, own, pool, train, model``."""
    args.device = "cpu"
    test = load_dataset(args.data, args.data_root, "test")
    train = load_dataset(args.data, args.data_root, "train")
    g = torch.Generator().manual_seed(args.seed)
    x = test.x[torch.randperm(len(test), generator=g)[: args.benchmark_samples]]
    pool = CandidatePool(train.x, train.y)
    ref_cps = tuple(sorted(set(boundary.BUDGETS) | {args.reference_budget}))
    ref, _, _ = boundary.run_cached(args, file_sha256(args.teacher), x, pool, "mbd", args.reference_budget, ref_cps)
    d_ref = ref.at(args.reference_budget)[: args.samples]
    labels = ref.teacher_labels[: args.samples]
    own = F.one_hot(labels, d_ref.shape[1]).bool()
    model, _ = load_weights(args.teacher)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return x[: args.samples], d_ref, labels, own, pool, train, model


def main() -> None:
    ap = benchmark_arguments(__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=2000, help="queries per pair for the recorded search")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x, d_ref, labels, own, pool, train, model = load_benchmark(args)
    pairs = torch.nonzero(~own)
    x0, tgt = x[pairs[:, 0]], pairs[:, 1]

    wb, delta = whitebox_min_l2(model, x0, tgt)
    ratio = wb / d_ref[pairs[:, 0], pairs[:, 1]]
    print(f"{len(pairs)} pairs. White-box minimal L2 / MBD at {args.reference_budget:,} queries: "
          f"median {ratio.median():.3f} (quartiles {ratio.quantile(0.25):.3f}, {ratio.quantile(0.75):.3f})")

    dflat = delta.flatten(1)
    flat_train = train.x.flatten(1)[:20000]
    pcs = torch.linalg.svd(flat_train - flat_train.mean(0), full_matrices=False).Vh
    D = dflat.shape[1]
    parts = [f"1/{s} resolution ({bilinear_basis(x.shape[1:], s).shape[0]} dims) {energy_in(dflat, bilinear_basis(x.shape[1:], s)):.2f}"
             for s in (2, 4)]
    parts += [f"top {k} principal components {energy_in(dflat, pcs[:k]):.2f}" for k in (100, 200, 400)]
    print(f"share of the white-box perturbation's energy (of {D} dims): " + "; ".join(parts))

    # the same estimator as the preset (same initialisation and settings), recording as it goes
    preset = create_estimator("hsja-sub-circle")
    est = Recording(model, init=preset.init, subspace=preset.subspace, subspace_queries=preset.subspace_queries,
                    update=preset.update)
    settings = RobustnessSettings(queries_per_pair=args.budget, checkpoints=(args.budget,), chunk_size=args.samples,
                                  seed=args.seed)
    compute_robustness(load_oracle(args.teacher), x, settings, estimator=est, pool=pool, progress=False)
    d_sub = bilinear_basis(x.shape[1:], preset.subspace).shape[0]
    print("\n| queries | estimates | probes | cos(estimate, true normal) | sqrt(2n/(pi D)) | "
          "cos(consecutive true normals) | cos(x_b - x0, true normal) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for b in sorted(est.rows):
        t = torch.tensor(est.rows[b])
        n = float(t[:, 3].mean())
        d_probe = d_sub if b * 250 < (preset.subspace_queries or 0) else D
        print(f"| {b * 250}-{b * 250 + 249} | {len(t)} | {n:.0f} | {t[:, 0].mean():.3f} | "
              f"{math.sqrt(2 * n / (math.pi * d_probe)):.3f} (D = {d_probe}) | {t[:, 2].nanmean():.3f} | "
              f"{t[:, 1].mean():.3f} |")


if __name__ == "__main__":
    main()
