"""Does the teacher's real logits beat its hard labels on the quickstart's few images?

The quickstart (configs/fashion-mnist/db3kd/quickstart.toml) trains LeNet-5-half students on
500 Fashion-MNIST training images: ``ce`` on the teacher's hard labels, ``whitebox-kd`` on
its logits (KD loss of zsdb3kd.distill: CE + kl_weight * KL at temperature T). In its one
seed white-box KD was below the hard labels. This benchmark trains both on the same images
with the quickstart's settings over several seeds, and KD at other temperatures and weights
(``kl_weight = T^2`` is Hinton et al.'s scaling) and other numbers of training steps, so
the report can say why. Records are added to ``--out`` (a rerun of a cell replaces it), and
``command`` lists every command that wrote them, one per line.

    python benchmarks/whitebox_kd.py --teacher runs/quickstart/teacher-lenet5-*.safetensors \
        --out docs/results/whitebox-kd.json

The teacher is the quickstart's (``bash scripts/quickstart.sh`` writes it). Each student is
selected on the 5,000 held-out training images, as in the quickstart; the test split is
read once per student.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from zsdb3kd.data import DataSettings, choose_subset
from zsdb3kd.distill import TrainSettings, accuracy, predict, train
from zsdb3kd.models import create_model
from zsdb3kd.store import write_json
from zsdb3kd.weights import file_sha256, load_weights

#: name -> (temperature, kl_weight); None: cross-entropy on the teacher's hard labels
VARIANTS = {"ce": None, "kd-T20-w1": (20.0, 1.0), "kd-T4-w1": (4.0, 1.0), "kd-T4-w16": (4.0, 16.0),
            "kd-T10-w100": (10.0, 100.0), "kd-T20-w400": (20.0, 400.0)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="the quickstart's teacher weights")
    ap.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: the installed data)")
    ap.add_argument("--subset", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=TrainSettings().batch_size)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="docs/results/whitebox-kd.json")
    a = ap.parse_args(argv)
    if not Path(a.teacher).is_file():
        raise SystemExit(f"no teacher at {a.teacher}: run `bash scripts/quickstart.sh` first, or pass --teacher")
    teacher, _ = load_weights(a.teacher)
    splits = DataSettings(name="fashion-mnist", root=a.data_root, val_size=5000).splits(0)
    sub = splits.train.subset(choose_subset(len(splits.train), a.subset, 0))  # the quickstart's images (seed 0)
    logits = predict(teacher, sub.x)
    hard = logits.argmax(1)
    out = Path(a.out)
    doc = json.loads(out.read_text()) if out.exists() else {"command": "", "records": []}
    sha = file_sha256(a.teacher)
    if doc.get("teacher_sha256", sha) != sha:
        raise SystemExit(f"{out} holds records of another teacher: write to another --out")
    steps = a.epochs * -(-a.subset // a.batch_size)
    new = []
    for name in a.variants:
        v = VARIANTS[name]
        cfg = TrainSettings(epochs=a.epochs, batch_size=a.batch_size,
                            **({} if v is None else {"temperature": v[0], "kl_weight": v[1]}))
        for seed in a.seeds:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = create_model("lenet5-half", num_classes=10, input_shape=tuple(sub.x.shape[1:]))
            res = train(model, sub.x, hard, splits.val.x, splits.val.y, cfg, seed=seed,
                        teacher_logits=None if v is None else logits, progress=False)
            acc = accuracy(model, splits.test.x, splits.test.y)
            new.append({"variant": name, "seed": seed, "epochs": a.epochs, "batch_size": a.batch_size, "steps": steps,
                        "temperature": cfg.temperature if v else None, "kl_weight": cfg.kl_weight if v else None,
                        "kl_reduction": cfg.kl_reduction, "test_acc": round(acc, 2),
                        "val_acc": round(res.best_val_acc, 2), "seconds": round(time.perf_counter() - t0, 1),
                        "threads": torch.get_num_threads()})
            print(f"{name} seed {seed} ({steps} steps): {acc:.2f}%", flush=True)
    key = lambda r: (r["variant"], r["seed"], r["epochs"], r["batch_size"])  # noqa: E731
    done = {key(r) for r in new}
    command = "python benchmarks/whitebox_kd.py " + " ".join(argv)
    doc.update(teacher_sha256=sha, subset=a.subset, records=[r for r in doc["records"] if key(r) not in done] + new,
               command="\n".join([c for c in doc["command"].splitlines() if c != command] + [command]))
    write_json(out, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
