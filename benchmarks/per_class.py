"""Per-class agreement of a run's students with its teacher: on the test images the teacher
puts in class c, the share the student also puts in c. It shows which classes a student's
candidates never resemble (docs/budget.md).

    python benchmarks/per_class.py runs/quickstart --data fashion-mnist
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from zsdb3kd.data import load_dataset
from zsdb3kd.distill import predict
from zsdb3kd.oracle import load_oracle
from zsdb3kd.weights import load_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory of 'zsdb3kd run'")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--data-root", default=None)
    args = ap.parse_args()
    test = load_dataset(args.data, args.data_root, "test")
    teacher = next(args.run.glob("teacher-*.safetensors"))
    t = load_oracle(teacher)(test.x)
    students = sorted(args.run.glob("*/student.safetensors")) + sorted(args.run.glob("student-*.safetensors"))
    print("| student | " + " | ".join(test.classes) + " |")
    print("|---|" + "---:|" * len(test.classes))
    for path in students:
        model, _ = load_weights(path)
        p = predict(model, test.x).argmax(1)
        per = [float((p[t == c] == c).float().mean() * 100) for c in range(len(test.classes))]
        name = path.parent.name if path.name == "student.safetensors" else path.stem
        print(f"| {name.rsplit('-', 1)[0]} | " + " | ".join(f"{v:.0f}" for v in per) + " |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
