"""Does the teacher keep its label when an image moves by a pixel? On real test images and on
the budgeted student's synthetic candidates (an experiment; not in the package).

    python benchmarks/invariance.py --out docs/results/invariance.json

For each dataset's benchmark teacher (``benchmarks/budget.py --teacher-dir``), 5,000 real
test images and 5,000 synthetic candidates of the default mix (``BudgetSettings().candidates``
with its deformations and cut-mix, as a first round draws them) are labelled, then labelled
again after one transform: ``shift1`` is the training augmentation of the budgeted student
(``augment_labelled``: a random translation by up to one pixel each way, zero fill, so one
image in nine does not move), ``shift2`` the same by up to two pixels, ``hflip`` a left-right
mirror. The record is the share of images whose label survives, over all of them and for the
class where it survives least. The test labels are not read; only the teacher's answers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget import DATASETS, teacher_for  # noqa: E402

from zsdb3kd.budget import BudgetSettings  # noqa: E402
from zsdb3kd.budget.candidates import synthesize  # noqa: E402
from zsdb3kd.budget.train import shift  # noqa: E402
from zsdb3kd.oracle import TorchOracle  # noqa: E402
from zsdb3kd.store import write_json  # noqa: E402

TRANSFORMS = {
    "shift1": lambda x, g: shift(x, g, pad=1),
    "shift2": lambda x, g: shift(x, g, pad=2),
    "hflip": lambda x, g: x.flip(3),
}


def survival(oracle: TorchOracle, x: torch.Tensor, seed: int) -> dict:
    """Per transform: the share (%) of ``x`` whose label it keeps, overall and at worst per class."""
    y = oracle(x)
    out = {"labels": torch.bincount(y, minlength=oracle.num_classes).tolist()}
    for name, f in TRANSFORMS.items():
        same = oracle(f(x, torch.Generator().manual_seed(seed))) == y
        per = [float(same[y == c].float().mean() * 100) for c in range(oracle.num_classes) if (y == c).any()]
        out[name] = {"all": round(float(same.float().mean() * 100), 1), "worst_class": round(min(per), 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["fashion-mnist", "mnist"], choices=sorted(DATASETS))
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-dir", default="runs/bench-teachers")
    ap.add_argument("--out", default="docs/results/invariance.json")
    args = ap.parse_args()
    s = BudgetSettings()
    records = []
    for name in args.datasets:
        data = DATASETS[name][0]
        oracle = TorchOracle.from_file(teacher_for(name, Path(args.teacher_dir)))
        real = data.load("test").x[: args.images]
        synthetic = synthesize(args.images, tuple(real.shape[1:]), torch.Generator().manual_seed(args.seed),
                               s.candidates, deform_p=s.deform_p, cutmix_p=s.cutmix_p)
        for kind, x in (("real test images", real), ("synthetic candidates", synthetic)):
            rec = {"dataset": name, "images": kind, "n": x.shape[0], **survival(oracle, x, args.seed)}
            print(rec, flush=True)
            records.append(rec)
    write_json(Path(args.out), {"command": "python benchmarks/invariance.py " + " ".join(sys.argv[1:]),
                                "records": records})


if __name__ == "__main__":
    main()
