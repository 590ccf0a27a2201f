"""Does a prior learned across pairs speed up the boundary search? (An experiment; not in the package.)

    python benchmarks/prior.py --teacher T.safetensors [--samples 10] [--prior-images 300] \
        [--cache runs/benchmark-cache]

For each target class, the top principal directions of the perturbations found for *other*
images (``--prior-images`` training images, disjoint from the benchmark's test images) form a
subspace ``B``. ``hsja-sub-circle`` then draws each probe with a share ``lam`` of its energy in
``B`` and the rest outside it, and reweights the sign-probe average by the inverse probe
covariance (the part outside ``B`` further scaled by ``shrink``; 1 is unbiased). Two priors:

* ``white-box``: minimal-L2 perturbations from the teacher's gradients (the best a prior of
  this kind can be; an attacker does not have it);
* ``label-only``: the directions ``hsja-sub-circle`` reaches at 1,000 queries per pair, which
  costs ``prior-images x 9 x 1,000`` queries once (a small share of a 60,000-image run).

Prints the median ratio to the paper-faithful MBD at 20,000 queries per pair (the
``boundary.py`` reference, from its cache) at 250 to 2,000 queries per pair, beside plain
``hsja-sub-circle``, and how much of each held-out white-box optimum the priors hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limits import benchmark_arguments, load_benchmark, whitebox_min_l2  # noqa: E402

from zsdb3kd.oracle import load_oracle  # noqa: E402
from zsdb3kd.robustness import RobustnessSettings, compute_robustness, create_estimator  # noqa: E402
from zsdb3kd.robustness import HopSkipJump  # noqa: E402
from zsdb3kd.robustness.tracker import PairTracker  # noqa: E402

BUDGETS = (250, 500, 1000, 2000)


class PriorHopSkipJump(HopSkipJump):
    """``hsja-sub-circle`` whose probes put a share ``lam`` of their energy in a per-target
    subspace (``basis``: ``(K, k, D)`` orthonormal rows per target class)."""

    def __init__(self, basis: torch.Tensor, lam: float = 0.3, shrink: float = 1.0, **kw) -> None:
        super().__init__(**kw)
        self.basis, self.lam, self.shrink = basis, lam, shrink

    def _draw(self, tr, ids, k, low, generator):
        B = self.basis[tr.target[ids]].to(tr.device)  # (n, kB, D)
        r = super()._draw(tr, ids, k, low, generator).to(tr.device)
        r = r - torch.einsum("ncj,njd->ncd", torch.einsum("ncd,njd->ncj", r, B), B)  # outside B
        z = torch.randn(len(ids), k, B.shape[1], generator=generator).to(tr.device) / B.shape[1] ** 0.5
        u = self.lam**0.5 * torch.einsum("ncj,njd->ncd", z, B) + (1 - self.lam) ** 0.5 * r
        return u / u.norm(dim=2, keepdim=True).clamp_min(1e-12)

    def _combine(self, tr, ids, m, low):
        B = self.basis[tr.target[ids]].to(tr.device)
        C, H, W = tr.x0.shape[1:]
        d_low = C * -(-H // self.subspace) * -(-W // self.subspace)  # dims of the low-resolution probes
        d_out = torch.where(low, float(d_low), float(C * H * W))
        m_in = torch.einsum("njd,nj->nd", B, torch.einsum("njd,nd->nj", B, m))
        return (B.shape[1] / self.lam) * m_in + self.shrink * (d_out[:, None] / (1 - self.lam)) * (m - m_in)


def per_target_basis(directions: torch.Tensor, target: torch.Tensor, K: int, k: int) -> torch.Tensor:
    d = F.normalize(directions.flatten(1), dim=1)
    counts = torch.bincount(target, minlength=K)
    if int(counts.min()) < k:
        raise SystemExit(f"a {k}-dimensional prior needs at least {k} directions per target class; class "
                         f"{int(counts.argmin())} has {int(counts.min())}: raise --prior-images")
    return torch.stack([torch.linalg.svd(d[target == t], full_matrices=False).Vh[:k] for t in range(K)])


def all_pairs(x: torch.Tensor, labels: torch.Tensor, K: int):
    src = labels.repeat_interleave(K - 1)
    tgt = (src + torch.arange(1, K).repeat(len(x))) % K
    return x.repeat_interleave(K - 1, 0), src, tgt


def main() -> None:
    ap = benchmark_arguments(__doc__.splitlines()[0])
    ap.add_argument("--prior-images", type=int, default=300)
    ap.add_argument("--settings", default="50:0.3:1,50:0.3:0.5,50:0.3:0.2,20:0.3:0.5",
                    help="comma-separated k:lam:shrink")
    args = ap.parse_args()
    x, d_ref, labels, own, pool, train, model = load_benchmark(args)
    K = d_ref.shape[1]

    # priors from training images that the benchmark never sees
    xp = train.x[torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed + 1))[: args.prior_images]]
    oracle = load_oracle(args.teacher)
    x0, src, tgt = all_pairs(xp, oracle(xp), K)
    wb = torch.cat([whitebox_min_l2(model, x0[i:i + 2000], tgt[i:i + 2000])[1] for i in range(0, len(x0), 2000)])
    tracker = PairTracker(oracle, x0, src, tgt, 1000, (1000,))
    found = create_estimator("hsja-sub-circle")(tracker, pool, torch.Generator().manual_seed(args.seed))
    ok = torch.isfinite(found.lam)
    priors = {"white-box": (wb, tgt), "label-only": (found.theta[ok], tgt[ok])}
    print(f"priors from {args.prior_images} training images x {K - 1} targets; the label-only one cost "
          f"{oracle.queries:,} queries")

    # how much of a held-out optimum lies in each prior's subspace
    xt, _, tt = all_pairs(x, labels, K)
    opt = F.normalize(whitebox_min_l2(model, xt, tt)[1].flatten(1), dim=1)
    for name, (dirs, t) in priors.items():
        shares = []
        for k in (10, 20, 50, 100):
            B = per_target_basis(dirs, t, K, k)[tt]
            shares.append(f"k={k}: {float(torch.einsum('pkd,pd->pk', B, opt).pow(2).sum(1).median()):.2f}")
        print(f"share of a held-out white-box optimum in the {name} prior: " + ", ".join(shares))

    def run(est) -> list[float]:
        s = RobustnessSettings(queries_per_pair=max(BUDGETS), checkpoints=BUDGETS, chunk_size=len(x), seed=args.seed)
        res = compute_robustness(load_oracle(args.teacher), x, s, estimator=est, pool=pool, progress=False)
        return [float((res.at(b)[~own] / d_ref[~own]).median()) for b in BUDGETS]

    print(f"\n{args.samples} samples x {K - 1} targets; median distance / MBD at 20,000 queries per pair\n")
    print("| estimator | prior | k | lam | shrink | " + " | ".join(f"{b:,}" for b in BUDGETS) + " |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(BUDGETS))
    print("| `hsja-sub-circle` | none | | | | " + " | ".join(f"{r:.3f}" for r in run(create_estimator("hsja-sub-circle"))) + " |")
    base = create_estimator("hsja-sub-circle")
    for name, (dirs, t) in priors.items():
        for spec in args.settings.split(","):
            k, lam, shrink = spec.split(":")
            est = PriorHopSkipJump(per_target_basis(dirs, t, K, int(k)), lam=float(lam), shrink=float(shrink),
                                   init=base.init, subspace=base.subspace, subspace_queries=base.subspace_queries,
                                   update="circle")
            print(f"| prior | {name} | {k} | {lam} | {shrink} | " + " | ".join(f"{r:.3f}" for r in run(est)) + " |")


if __name__ == "__main__":
    main()
