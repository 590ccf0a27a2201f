"""The CPU memory layout: a training step and inference in the default layout against
``zsdb3kd.models.on_device`` (channels-last on the CPU), per architecture.

    python benchmarks/layout.py --threads 1 --out docs/results/layout.json

Each figure is the best of ``--repeats`` timed runs, the two layouts alternating so that a
shared machine's noise falls on both.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from zsdb3kd.models import create_model, on_device
from zsdb3kd.store import write_json

ARCHS = {"lenet5-half": (1, 28, 28), "lenet5": (1, 28, 28), "alexnet-half": (3, 32, 32), "cnn-small": (1, 8, 12)}


def timer(arch: str, shape: tuple[int, int, int], fast: bool, train: bool, batch: int):
    """A function that runs ``steps`` training steps (or forward passes) and returns ms per call."""
    torch.manual_seed(0)
    model = create_model(arch, input_shape=shape)
    if fast:
        on_device(model, "cpu")
    x, y = torch.rand(batch, *shape), torch.randint(0, 10, (batch,))
    opt = torch.optim.Adam(model.parameters(), 1e-3)

    def once() -> None:
        if train:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)

    def run(steps: int) -> float:
        model.train(train)
        once()  # warm-up
        t = time.perf_counter()
        for _ in range(steps):
            once()
        return (time.perf_counter() - t) / steps * 1e3
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for arch, shape in ARCHS.items():
        for what, train, batch, steps in (("train step, 128 images", True, 128, 20), ("inference, 1,024 images", False,
                                                                                     1024, 5)):
            runs = {False: timer(arch, shape, False, train, batch), True: timer(arch, shape, True, train, batch)}
            times = {k: [] for k in runs}
            for _ in range(args.repeats):  # the layouts alternate
                for k in runs:
                    times[k].append(runs[k](steps))
            best = {k: min(v) for k, v in times.items()}
            rows.append({"arch": arch, "input_shape": list(shape), "what": what, "default_ms": round(best[False], 2),
                         "channels_last_ms": round(best[True], 2), "speedup": round(best[False] / best[True], 2)})
            print(f"{arch:13s} {what:24s} default {best[False]:8.2f} ms  channels-last {best[True]:8.2f} ms  "
                  f"x{best[False] / best[True]:.2f}", flush=True)
    if args.out:
        write_json(args.out, {"command": "python benchmarks/layout.py " + " ".join(sys.argv[1:]),
                              "threads": args.threads, "torch": torch.__version__, "rows": rows})


if __name__ == "__main__":
    main()
