"""Student accuracy from soft labels of different boundary-distance runs, paired over seeds.

    python benchmarks/students.py --teacher T.safetensors \
        --labels ref=runs/ref/mbd20k.safetensors@20000 --labels mbd1k=runs/ref/mbd20k.safetensors@1000 \
        --labels hsja1k=runs/ref/hsja-sub.safetensors@1000 [--seeds 0,1,2,3,4] [--epochs 200]

Each ``--labels NAME=FILE@BUDGET`` is a robustness file (from ``zsdb3kd robustness`` on the
training split) read at a budget per pair. All of them must cover the same samples. For
every seed, one student per entry (plus ``ce``, the teacher's hard labels on the same
samples) is trained with the same initial weights and batch order, selected on the same
held-out split and evaluated once on the test split. The table shows the mean and standard
deviation of test accuracy over seeds and, per entry, the paired difference to the first
entry (the reference): the seeds are shared, so the difference is less noisy than either mean.

First it prints each entry's distances against the first entry's: the median ratio over
all pairs and over each sample's 3 nearest targets, and the soft labels' KL (T = 20) and
top-2 agreement.

The data split (``--data``, ``--val-size``, ``--split-seed``) must be the one the robustness
files were computed on; the file's indices are checked against it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zsdb3kd.distill import TrainSettings, accuracy, train
from zsdb3kd.models import create_model
from zsdb3kd.data import load_splits
from zsdb3kd.robustness import RobustnessResult
from zsdb3kd.softlabels import logits_from_distances


def parse_labels(spec: str) -> tuple[str, Path, int]:
    """``name=file@budget`` -> (name, path, budget)."""
    name, eq, rest = spec.partition("=")
    path, at, budget = rest.rpartition("@")
    if not eq or not at or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE@BUDGET, got {spec!r}")
    try:
        b = int(budget)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be an integer in {spec!r}") from None
    return name, Path(path), b


def print_label_quality(names: list[str], dists: list[torch.Tensor], labels: torch.Tensor, top: int = 3) -> None:
    """Each entry's distances as a median ratio to the first entry's, over all pairs and over
    each sample's ``top`` nearest targets (by the first entry), and its soft labels' agreement."""
    from boundary import soft_agreement

    ref = dists[0]
    own = torch.nn.functional.one_hot(labels, ref.shape[1]).bool()
    nearest = torch.zeros_like(own).scatter_(1, ref.masked_fill(own, float("inf")).argsort(1)[:, :top], True)
    print(f"| labels | median ratio to {names[0]} | on the {top} nearest targets | KL at T = 20 | top-2 agreement |")
    print("|---|---:|---:|---:|---:|")
    for name, d in zip(names, dists):
        kl, top2 = soft_agreement(d, ref, labels)
        r = d / ref
        print(f"| {name} | {r[~own].median():.3f} | {r[nearest].median():.3f} | {kl:.2e} | {top2:.2f} |")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=parse_labels, action="append", required=True,
                    help="NAME=FILE@BUDGET; the first one is the reference")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--val-size", type=int, default=5000)
    ap.add_argument("--split-seed", type=int, default=0, help="--seed the robustness files were computed with")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="training seeds, comma separated")
    ap.add_argument("--student", default="lenet5-half")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--val-limit", type=int, default=1000,
                    help="select models on the first N held-out images (evaluated every epoch)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--kl-reduction", default="sum", choices=["sum", "batchmean"],
                    help="KL summed over the batch (as released) or averaged")
    ap.add_argument("--no-ce", action="store_true", help="skip the hard-label baseline")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    splits = load_splits(args.data, args.data_root, args.val_size, args.split_seed)
    entries = []
    dists = []
    indices = labels = None
    for name, path, budget in args.labels:
        if not path.is_file():
            ap.error(f"no such robustness file: {path}")
        res = RobustnessResult.load(path)
        if budget not in [int(c) for c in res.checkpoints]:
            ap.error(f"{path} has no checkpoint {budget}; it has {[int(c) for c in res.checkpoints]}")
        if indices is None:
            indices, labels = res.indices, res.teacher_labels
        elif not torch.equal(res.indices, indices):
            ap.error(f"{path} covers other samples than {args.labels[0][1]}")
        if int(res.indices.max()) >= len(splits.train):
            ap.error(f"{path} does not index this training split (same --data/--val-size/--split-seed?)")
        entries.append((name, logits_from_distances(res.at(budget), res.teacher_labels)))
        dists.append(res.at(budget))
    if not args.no_ce:
        entries.append(("ce (hard labels)", None))
    print_label_quality([e[0] for e in entries], dists, labels)
    x = splits.train.x[indices]
    xv, yv = splits.val.x[: args.val_limit], splits.val.y[: args.val_limit]
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{len(indices)} samples, {len(seeds)} seeds, {args.epochs} epochs of batch {args.batch_size}, "
          f"T = {args.temperature}, KL {args.kl_reduction}, "
          f"student {args.student}, selected on {len(yv)} held-out images", flush=True)

    acc: dict[str, list[float]] = {name: [] for name, _ in entries}
    for seed in seeds:
        cfg = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            temperature=args.temperature, kl_reduction=args.kl_reduction)
        for name, logits in entries:
            torch.manual_seed(seed)
            model = create_model(args.student, num_classes=len(splits.train.classes), input_shape=tuple(x.shape[1:]))
            train(model, x, labels, xv, yv, cfg, seed=seed, teacher_logits=logits, progress=False)
            acc[name].append(accuracy(model, splits.test.x, splits.test.y))
            print(f"seed {seed} {name}: {acc[name][-1]:.2f}%", flush=True)

    ref_name = entries[0][0]
    print(f"\n| labels | test acc. (mean ± sd over {len(seeds)} seeds) | paired difference to {ref_name} |")
    print("|---|---:|---:|")
    for name, _ in entries:
        a = acc[name]
        diff = [u - v for u, v in zip(a, acc[ref_name])]
        sd = statistics.stdev(a) if len(a) > 1 else 0.0
        dsd = statistics.stdev(diff) if len(diff) > 1 else 0.0
        d = "" if name == ref_name else f"{statistics.mean(diff):+.2f} ± {dsd:.2f}"
        print(f"| {name} | {statistics.mean(a):.2f} ± {sd:.2f} | {d} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
