"""Query efficiency of boundary-distance estimators, side by side, from one run.

    python benchmarks/boundary.py --teacher T.safetensors --samples 50 \
        [--methods mbd hsja] [--peers foolbox-hsja,art-signopt] [--reference-budget 20000] [--cache DIR]

For each estimator: the median over (sample, target) pairs of the distance reached at
250, 500, 1k, 2k and 4k queries per pair, as a ratio to the paper-faithful MBD at the
reference budget (20,000 by default), and the 90th percentile of that ratio at 2k and 4k;
agreement of the resulting soft labels with the
reference's (mean KL at T=20 and top-2 agreement) at 1k and 2k; wall time and q/s.
Every run is cached under ``--cache`` (keyed by teacher hash, samples, seed and
settings), so the expensive reference is computed once and an interrupted run resumes.
With ``--out FILE.json`` the tables are also written as JSON (with the command), from which
``python scripts/results_pages.py`` renders ``docs/results/boundary-distances.md``.

Peers (optional benchmark dependencies, not package dependencies), on the same teacher,
samples and targets, each pair starting from the nearest training image of the target
class: foolbox's HopSkipJumpAttack and ART's SignOPTAttack
(``pip install foolbox==3.3.4 adversarial-robustness-toolbox==1.20.1``). See peers.py.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from zsdb3kd.data import load_dataset
from zsdb3kd.oracle import load_oracle
from zsdb3kd.robustness import CandidatePool, RobustnessResult, RobustnessSettings, compute_robustness
from zsdb3kd.softlabels import logits_from_distances
from zsdb3kd.store import write_json
from zsdb3kd.weights import file_sha256

BUDGETS = (250, 500, 1000, 2000, 4000)


def soft_agreement(d: torch.Tensor, d_ref: torch.Tensor, labels: torch.Tensor, T: float = 20.0):
    """Mean KL(ref || d) of the soft labels at temperature ``T`` and the fraction of samples
    whose two most likely classes agree with the reference's."""
    z, zr = logits_from_distances(d, labels), logits_from_distances(d_ref, labels)
    p, pr = torch.log_softmax(z / T, 1), torch.log_softmax(zr / T, 1)
    kl = float((pr.exp() * (pr - p)).sum(1).mean())
    top2 = float((z.topk(2, 1).indices.sort(1).values == zr.topk(2, 1).indices.sort(1).values).all(1).float().mean())
    return kl, top2


def run_cached(args, teacher_sha, x, pool, method, budget, checkpoints):
    s = RobustnessSettings(method=method, queries_per_pair=budget, checkpoints=checkpoints, chunk_size=len(x),
                           seed=args.seed)
    tag = f"{teacher_sha[:12]}-{args.data}-n{len(x)}-s{args.seed}-{method}-{s.key()}"
    path = Path(args.cache) / f"{tag}.safetensors"
    if path.exists():
        res = RobustnessResult.load(path)
        return res, res.provenance["wall_s"], res.provenance["queries"]
    oracle = load_oracle(args.teacher, device=args.device)
    t0 = time.perf_counter()
    res = compute_robustness(oracle, x, s, pool=pool, work_dir=path.with_suffix(".parts"), progress=True)
    wall = time.perf_counter() - t0
    res.provenance.update(wall_s=wall, queries=oracle.queries)
    path.parent.mkdir(parents=True, exist_ok=True)
    res.save(path)
    return res, wall, oracle.queries


def nearest_start(x, target, pool_x, pool_y, model):
    """For each pair, the nearest pool image of the target class that the teacher labels as
    the target (peers' starting points; found with the model directly, not counted)."""
    with torch.no_grad():
        pool_pred = torch.cat([model(pool_x[i:i + 4096]).argmax(1) for i in range(0, len(pool_x), 4096)])
    flat = pool_x.reshape(len(pool_x), -1)
    out = torch.empty_like(x)
    for c in torch.unique(target).tolist():
        rows = torch.nonzero(target == c).squeeze(1)
        members = torch.nonzero((pool_y == c) & (pool_pred == c)).squeeze(1)
        d = torch.cdist(x[rows].reshape(len(rows), -1), flat[members])
        out[rows] = pool_x[members[d.argmin(1)]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--methods", nargs="+", default=["mbd", "hsja"],
                    help="method specs, space-separated, e.g. mbd 'hybrid:reuse=0.5,k=50'")
    ap.add_argument("--peers", default="", help="comma-separated: foolbox-hsja, art-signopt")
    ap.add_argument("--reference-budget", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache", default="runs/benchmark-cache")
    ap.add_argument("--reach-budget", type=int, default=0,
                    help="also run our methods to this many queries per pair (checkpoints every 1,000) and "
                         "print how many they need to come within --reach of the reference")
    ap.add_argument("--reach", default="1.05,1.10", help="median-ratio targets for --reach-budget")
    ap.add_argument("--out", default=None, help="also write the tables as JSON here")
    args = ap.parse_args()
    if args.reach_budget and args.reach_budget < 1000:
        ap.error("--reach-budget must be at least 1000")
    test = load_dataset(args.data, args.data_root, "test")
    train = load_dataset(args.data, args.data_root, "train")
    g = torch.Generator().manual_seed(args.seed)
    x = test.x[torch.randperm(len(test), generator=g)[: args.samples]].to(args.device)
    pool = CandidatePool(train.x.to(args.device), train.y.to(args.device))
    sha = file_sha256(args.teacher)
    ref_checkpoints = tuple(sorted(set(BUDGETS) | {args.reference_budget}))
    ref, ref_wall, ref_q = run_cached(args, sha, x, pool, "mbd", args.reference_budget, ref_checkpoints)
    d_ref = ref.at(args.reference_budget).cpu()
    labels = ref.teacher_labels.cpu()
    own = torch.nn.functional.one_hot(labels, d_ref.shape[1]).bool()
    print(f"reference: paper-faithful MBD at {args.reference_budget:,} queries/pair, {args.samples} samples x "
          f"{d_ref.shape[1] - 1} targets: {ref_q:,} queries, {ref_wall:.0f} s, median distance {d_ref[~own].median():.4f}")
    rows = []
    for spec in args.methods:
        if spec == "mbd":
            res, wall, q = ref, ref_wall, ref_q  # the same run, read at each checkpoint
            d = {b: res.at(b).cpu() for b in BUDGETS}
            # time to the largest benchmark budget, pro rata (the reference ran to 20k)
            wall = wall * max(BUDGETS) / args.reference_budget
            q = q * max(BUDGETS) // args.reference_budget
        else:
            res, wall, q = run_cached(args, sha, x, pool, spec, max(BUDGETS), BUDGETS)
            d = {b: res.at(b).cpu() for b in BUDGETS}
        rows.append((spec, d, wall, q))
    if args.peers:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import peers as peer_mod
        from zsdb3kd.weights import load_weights

        model, _ = load_weights(args.teacher, device=args.device)
        pairs = torch.nonzero(~own)  # (sample, target) in row-major order
        xs, tg = x[pairs[:, 0]], pairs[:, 1].to(args.device)
        start = nearest_start(xs, tg, train.x.to(args.device), train.y.to(args.device), model)
        for name in filter(None, args.peers.split(",")):
            path = Path(args.cache) / f"{sha[:12]}-{args.data}-n{args.samples}-s{args.seed}-{name}.pt"
            if path.exists():
                blob = torch.load(path, weights_only=True)
            else:
                t0 = time.perf_counter()
                dist = peer_mod.PEERS[name](model, xs, tg, start, BUDGETS, seed=args.seed)
                blob = {"dist": dist.cpu(), "wall": time.perf_counter() - t0}
                torch.save(blob, path)
            full = torch.full((len(BUDGETS),) + d_ref.shape, float("nan"))
            full[:, pairs[:, 0], pairs[:, 1]] = blob["dist"].T
            d = {b: full[i] for i, b in enumerate(BUDGETS)}
            q = len(pairs) * max(BUDGETS)
            rows.append((name + " (peer)", d, blob["wall"], q))
    records = [summarise(spec, d, d_ref, own, labels, wall, q) for spec, d, wall, q in rows]
    header = ("| estimator | " + " | ".join(f"{b} q" for b in BUDGETS)
              + " | p90@2k | p90@4k | KL@1k | top2@1k | KL@2k | top2@2k | wall to 4k (s) | q/s |")
    print(header)
    print("|" + "---|" * (len(BUDGETS) + 9))
    for r in records:
        print(f"| {r['estimator']} | " + " | ".join(f"{v:.3f}" for v in r["median_ratio"].values()) + " | "
              + " | ".join(f"{v:.3f}" for v in r["p90_ratio"].values())
              + f" | {r['kl'][1000]:.2e} | {r['top2'][1000]:.2f} | {r['kl'][2000]:.2e} | {r['top2'][2000]:.2f}"
              f" | {r['wall_s']:.0f} | {r['queries'] / r['wall_s']:,.0f} |")
    reach = reach_table(args, sha, x, pool, d_ref, own, ref_wall) if args.reach_budget else []
    if args.out:
        write_json(args.out, {
            "command": "python " + shlex.join(sys.argv),
            "teacher_sha256": sha, "data": args.data, "samples": args.samples, "targets": int(d_ref.shape[1] - 1),
            "pairs": int((~own).sum()), "seed": args.seed, "budgets": list(BUDGETS),
            "reference": {"method": "mbd", "queries_per_pair": args.reference_budget, "queries": ref_q,
                          "wall_s": ref_wall, "median_distance": float(d_ref[~own].median())},
            "threads": torch.get_num_threads(), "rows": records, "reach": reach})
        print(f"wrote {args.out}")


def summarise(spec, d, d_ref, own, labels, wall, q) -> dict:
    """One estimator's row: median and 90th-percentile ratio to the reference per budget, soft-label
    agreement at 1k and 2k, wall time and queries."""
    ratio = {b: d[b][~own] / d_ref[~own] for b in BUDGETS}
    kl, top2 = {}, {}
    for b in (1000, 2000):
        kl[b], top2[b] = soft_agreement(d[b], d_ref, labels)
    return {"estimator": spec, "median_ratio": {b: float(ratio[b].median()) for b in BUDGETS},
            # the tail: the worst pairs dominate a soft label
            "p90_ratio": {b: float(ratio[b].nan_to_num(posinf=1e9).quantile(0.9)) for b in (2000, 4000)},
            "kl": kl, "top2": top2, "wall_s": float(wall), "queries": int(q)}


def reach_table(args, sha, x, pool, d_ref, own, ref_wall) -> list[dict]:
    """Queries per pair (and wall time, pro rata) each of our methods needs before its median
    ratio to the reference falls to each ``--reach`` target."""
    targets = [float(t) for t in args.reach.split(",")]
    cps = tuple(range(1000, args.reach_budget + 1, 1000))
    print(f"\nqueries per pair to reach the reference ({args.reference_budget:,} q/pair, {ref_wall:.0f} s); "
          f"searched up to {args.reach_budget:,}, in steps of 1,000")
    print("| estimator | " + " | ".join(f"median <= {t:.2f}x: q/pair, s, speed-up" for t in targets) + " |")
    print("|" + "---|" * (len(targets) + 1))
    out = []
    for spec in args.methods:
        if spec == "mbd":
            continue  # the reference itself
        res, wall, q = run_cached(args, sha, x, pool, spec, args.reach_budget, cps)
        med = {b: float((res.at(b).cpu()[~own] / d_ref[~own]).median()) for b in cps}
        cells = []
        for t in targets:
            hit = next((b for b in cps if med[b] <= t), None)
            w = wall * hit / args.reach_budget if hit is not None else None
            out.append({"estimator": spec, "target": t, "queries_per_pair": hit, "wall_s": w,
                        "median_at_end": med[cps[-1]], "searched_to": args.reach_budget})
            if hit is None:
                cells.append(f"not within {args.reach_budget:,} ({med[cps[-1]]:.3f}x)")
            else:
                cells.append(f"{hit:,}, {w:.0f} s, {args.reference_budget / hit:.1f}x q / {ref_wall / w:.1f}x time")
        print(f"| {spec} | " + " | ".join(cells) + " |")
    return out


if __name__ == "__main__":
    main()
