"""Query efficiency of boundary-distance estimators, side by side, from one run.

    python benchmarks/boundary.py --teacher T.safetensors --samples 50 [--methods mbd,hsja] [--reference-budget 20000]

For each estimator: the median over (sample, target) pairs of the distance reached at
250, 500, 1k, 2k and 4k queries per pair, as a ratio to the paper-faithful MBD at the
reference budget (20,000 by default); agreement of the resulting soft labels with the
reference's (mean KL at T=20 and top-2 agreement) at each budget; wall time and q/s.
Optional peers, run on the same teacher and samples when installed (benchmark-only
dependencies, not package dependencies): foolbox's HopSkipJumpAttack and ART's
SignOPTAttack (``pip install foolbox adversarial-robustness-toolbox``).
"""

from __future__ import annotations

import argparse
import time

import torch

from zsdb3kd.data import load_dataset
from zsdb3kd.oracle import load_oracle
from zsdb3kd.robustness import CandidatePool, RobustnessSettings, compute_robustness
from zsdb3kd.softlabels import logits_from_distances

BUDGETS = (250, 500, 1000, 2000, 4000)


def soft_agreement(d: torch.Tensor, d_ref: torch.Tensor, labels: torch.Tensor, T: float = 20.0):
    z, zr = logits_from_distances(d, labels), logits_from_distances(d_ref, labels)
    p, pr = torch.log_softmax(z / T, 1), torch.log_softmax(zr / T, 1)
    kl = float((pr.exp() * (pr - p)).sum(1).mean())
    top2 = float((z.topk(2, 1).indices.sort(1).values == zr.topk(2, 1).indices.sort(1).values).all(1).float().mean())
    return kl, top2


def run(oracle_path, x, pool, method, budget, checkpoints, seed):
    oracle = load_oracle(oracle_path)
    s = RobustnessSettings(method=method, budget=budget, checkpoints=checkpoints, chunk_size=len(x), seed=seed)
    t0 = time.perf_counter()
    res = compute_robustness(oracle, x, s, pool=pool, progress=False)
    return res, time.perf_counter() - t0, oracle.queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--methods", default="mbd,hsja")
    ap.add_argument("--reference-budget", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    test = load_dataset(args.data, args.data_root, "test")
    train = load_dataset(args.data, args.data_root, "train")
    g = torch.Generator().manual_seed(args.seed)
    x = test.x[torch.randperm(len(test), generator=g)[: args.samples]]
    pool = CandidatePool(train.x, train.y)
    ref, ref_wall, ref_q = run(args.teacher, x, pool, "mbd", args.reference_budget, BUDGETS, args.seed)
    d_ref = ref.at(args.reference_budget)
    own = torch.nn.functional.one_hot(ref.teacher_labels, d_ref.shape[1]).bool()
    print(f"reference: paper-faithful MBD at {args.reference_budget:,} queries/pair: {ref_q:,} queries, "
          f"{ref_wall:.0f} s, median distance {d_ref[~own].median():.4f}")
    header = "| estimator | " + " | ".join(f"{b} q" for b in BUDGETS) + " | KL@1k | top2@1k | wall (s) | q/s |"
    print(header)
    print("|" + "---|" * (len(BUDGETS) + 5))
    for method in args.methods.split(","):
        if method == "mbd":
            res, wall, q = ref, ref_wall, ref_q  # the same run, read at each checkpoint
        else:
            res, wall, q = run(args.teacher, x, pool, method, max(BUDGETS), BUDGETS, args.seed)
        ratios = []
        for b in BUDGETS:
            r = (res.at(b)[~own] / d_ref[~own])
            ratios.append(float(r.median()))
        kl, top2 = soft_agreement(res.at(1000), d_ref, ref.teacher_labels)
        print(f"| {method} | " + " | ".join(f"{r:.3f}" for r in ratios) + f" | {kl:.2e} | {top2:.2f} | {wall:.0f} | "
              f"{q / wall:,.0f} |")


if __name__ == "__main__":
    main()
