"""Prototypes against recipe v2 (the defaults): is the synthetic prior's look, or the final
student's training, what limits the zero-shot student? Records go to ``--out`` (JSON) and
``python scripts/results_pages.py`` renders them in docs/results/levers.md; the findings are in
docs/budget.md ("Where it stands").

    OMP_NUM_THREADS=1 python benchmarks/priors.py --tag stretch --stretch 1 --seeds 0 1
    OMP_NUM_THREADS=1 python benchmarks/priors.py --tag parts --parts 3 --seeds 0 1
    zsdb3kd extract --teacher runs/bench-teachers/fashion-mnist-lenet5.safetensors --budget 10000 --out runs/lab/s10k.safetensors
    python benchmarks/priors.py --tag ensemble --ensemble-of runs/lab/s10k.safetensors.work --seeds 0 1 2 3 4 5
    OMP_NUM_THREADS=1 python benchmarks/priors.py --tag distill --ensemble-of runs/lab/s10k.safetensors.work \
        --seeds 0 1 2 3 --distill 0.5 [--free 128]
    python benchmarks/priors.py --stats

* ``--stretch P``: a share ``P`` of the candidates (fresh and variations of labelled images)
  rescaled so that their brightest pixel is 1. Every real Fashion-MNIST image spans the full
  range; the default mix's candidates are dimmer (``--stats`` prints both).
* ``--parts W``: a prototype candidate kind with weight ``W`` added to the default mix: large
  upright objects built from a body and mirrored pairs of limbs (superellipses, some tapered),
  bright textured or striped fill, sometimes a dark opening: shapes closer to clothes, bags and
  shoes than the default kinds.
* ``--ensemble-of WORK``: no query at all. The labelled images of a finished budgeted run
  (its work directory) train one fresh final student per seed, as the recipe trains its own;
  the record gives each student's test accuracy and that of the average of their predicted
  probabilities: how much of the spread between runs comes from the final training rather
  than from which images were bought. With ``--distill ALPHA``, one more fresh student learns
  from that ensemble (see :func:`distill`): can a single student keep the ensemble's gain?
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget import DATASETS, save_cell, teacher_for, teacher_identity  # noqa: E402

from zsdb3kd.budget import BudgetSettings, train_budgeted  # noqa: E402
from zsdb3kd.budget import candidates as C  # noqa: E402
from zsdb3kd.budget.candidates import _colour, _grid, _u, octave_noise  # noqa: E402
from zsdb3kd.budget.method import build_student  # noqa: E402
from zsdb3kd.budget.select import predict  # noqa: E402
from zsdb3kd.budget.train import fit, mix, shift  # noqa: E402
from zsdb3kd.models import on_device  # noqa: E402
from zsdb3kd.oracle import TorchOracle  # noqa: E402
from zsdb3kd.store import generator, read_tensors, write_tensors  # noqa: E402


def _part(yy, xx, cy, cx, hh, hw, rot, p, taper):
    """Soft mask of a rotated superellipse (exponent ``p``: 2 ellipse, large: box), its width
    tapered along its height."""
    dy, dx = yy - cy, xx - cx
    u = dx * torch.cos(rot) + dy * torch.sin(rot)
    v = -dx * torch.sin(rot) + dy * torch.cos(rot)
    wv = hw * (1 + taper * (v / hh).clamp(-1, 1)).clamp_min(0.2)
    r = (u.abs() / wv) ** p + (v.abs() / hh) ** p
    return torch.sigmoid((1 - r) * 8)


def parts(n, shape, g):
    """One or two bodies near the centre, zero to two mirrored pairs of limbs, bright fill."""
    c, h, w = shape
    yy, xx = _grid(h, w)
    yy, xx = yy[None], xx[None]

    def U(lo, hi):
        return _u(g, n, 1, 1, lo=lo, hi=hi)

    mask = torch.zeros(n, h, w)
    nb = torch.randint(1, 3, (n, 1, 1), generator=g)
    for i in range(2):
        m = _part(yy, xx, U(-0.15, 0.15), U(-0.08, 0.08), U(0.4, 0.95), U(0.25, 0.8),
                  U(-0.3, 0.3) * (torch.rand(n, 1, 1, generator=g) < 0.3), U(1.5, 8.0), U(-0.5, 0.5))
        mask = torch.maximum(mask, m * (nb > i).float())
    npair = torch.randint(0, 3, (n, 1, 1), generator=g)
    for i in range(2):
        cy, dx, hh, hw, rot, p, tp = U(-0.6, 0.6), U(0.1, 0.65), U(0.15, 0.7), U(0.06, 0.25), U(-0.9, 0.9), \
            U(1.5, 8.0), U(-0.4, 0.4)
        pair = torch.maximum(_part(yy, xx, cy, dx, hh, hw, rot, p, tp), _part(yy, xx, cy, -dx, hh, hw, -rot, p, tp))
        mask = torch.maximum(mask, pair * (npair > i).float())
    mask = mask[:, None]
    tex = octave_noise(n, shape, g)
    sym = (torch.rand(n, 1, 1, 1, generator=g) < 0.5).float()
    tex = sym * 0.5 * (tex + tex.flip(-1)) + (1 - sym) * tex
    tex_amt = _u(g, n, 1, 1, 1, hi=0.7)
    stripes = torch.sin(yy[None] * _u(g, n, 1, 1, 1, lo=5, hi=30) + _u(g, n, 1, 1, 1, hi=6.3)) * 0.5 + 0.5
    st_on = (torch.rand(n, 1, 1, 1, generator=g) < 0.2).float() * _u(g, n, 1, 1, 1, hi=0.6)
    fill = (_colour(n, c, g) * 0.65 + 0.35) * (1 - tex_amt * tex) * (1 - st_on * stripes)
    hole = _part(yy, xx, U(-0.6, 0.2), U(-0.05, 0.05), U(0.05, 0.25), U(0.05, 0.3), U(-0.2, 0.2) * 0, U(1.5, 4),
                 U(-0.3, 0.3))[:, None]
    hole = hole * (torch.rand(n, 1, 1, 1, generator=g) < 0.3).float()
    return (fill * mask * (1 - 0.8 * hole)).clamp(0, 1)


def stretched(fn, share: float):
    """``fn`` (a candidate maker returning images first), then a ``share`` of its images
    rescaled so their brightest pixel is 1 (random numbers from the same generator)."""
    def wrapped(*args, **kw):
        x = fn(*args, **kw)
        g = args[2]
        m = x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(0.05)
        top = 1.0 + 0.0 * torch.rand(x.shape[0], 1, 1, 1, generator=g)  # the same stream as when measured
        sel = (torch.rand(x.shape[0], 1, 1, 1, generator=g) < share).float()
        return (sel * (x / m * top) + (1 - sel) * x).clamp(0, 1)
    return wrapped


def _labelled(work: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = [read_tensors(p) for p in sorted(work.glob("round-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))]
    if not d:
        raise SystemExit(f"{work}: no round-*.safetensors (the work directory of a finished budgeted run)")
    return (torch.cat([t["x"] for t in d]).float() / 255, torch.cat([t["y"] for t in d]).long(),
            torch.cat([t["v"] for t in d]).bool())


def _pct(pred: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((pred == ref).float().mean() * 100), 2)


def members(work: Path, seeds: list[int], arch: str, k: int, cache: bool = False) -> list[torch.nn.Module]:
    """One fresh final student per seed on a finished run's labelled images (held-out rows
    excluded), trained as the recipe trains its final student; with ``cache``, kept in
    ``work/lab-member-<seed>.safetensors`` and read back from there."""
    x, y, v = _labelled(work)
    s, cpu, out = BudgetSettings(), torch.device("cpu"), []
    for sd in seeds:
        m = on_device(build_student(arch, k, tuple(x.shape[1:]), 1000 + sd), cpu)
        f = work / f"lab-member-{sd}.safetensors"
        if cache and f.exists():
            m.load_state_dict(read_tensors(f))
        else:
            fit(m, x[~v], y[~v], s.final_epochs, s, generator(sd, "lab", "train"), k, cpu, cosine=True)
            if cache:
                write_tensors(f, {n: p.contiguous() for n, p in m.state_dict().items()})
        m.eval()
        out.append(m)
    return out


def ensemble(work: Path, seeds: list[int], dataset: str, test, t_pred) -> dict:
    """Fresh final students on a finished run's labelled images, each and together."""
    n = int(_labelled(work)[1].numel())
    probs = [predict(m, test.x) for m in members(work, seeds, DATASETS[dataset][3], int(t_pred.max()) + 1)]
    ens = torch.stack(probs).mean(0).argmax(1)
    return {"members": [_pct(p.argmax(1), test.y) for p in probs], "test_acc": _pct(ens, test.y),
            "fidelity": _pct(ens, t_pred), "queries": 0, "budget": n}


def distill(work: Path, seeds: list[int], dataset: str, test, t_pred, alpha: float, free: int, seed: int = 100) -> dict:
    """One fresh student from the ensemble of ``seeds``' final students: the recipe's final
    training (class-balanced batches, shifted copies, mixup, cosine rate, final_epochs) with
    targets ``alpha`` x the teacher's (mixed) labels + (1 - alpha) x the ensemble's probabilities
    on the same (augmented) images; with ``free``, that many fresh candidates join each batch
    with the ensemble's probabilities as their only target (no query)."""
    x, y, v = _labelled(work)
    n = int(y.numel())
    x, y = x[~v], y[~v]
    arch, k, s, shape = DATASETS[dataset][3], int(t_pred.max()) + 1, BudgetSettings(), tuple(x.shape[1:])
    team = members(work, seeds, arch, k, cache=True)
    acc = [_pct(predict(m, test.x).argmax(1), test.y) for m in team]

    def soft(xb):
        with torch.no_grad():
            return torch.stack([F.softmax(m(xb), 1) for m in team]).mean(0)

    g = generator(seed, "lab", "kd")
    st = on_device(build_student(arch, k, shape, 5000 + seed), torch.device("cpu"))
    steps = int(math.ceil(s.final_epochs * x.shape[0] / s.batch_size))
    opt = torch.optim.Adam(st.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    wts = (1.0 / torch.bincount(y, minlength=k).float().clamp_min(1))[y]
    st.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.multinomial(wts, s.batch_size, replacement=True, generator=g)
        xb, yb = x[idx], y[idx]
        aug = torch.rand(xb.shape[0], generator=g) < s.augment_labelled
        xb = torch.where(aug[:, None, None, None], shift(xb, g), xb)
        xb, t = mix(xb, yb, s.mixup, k, g)
        tgt = alpha * t + (1 - alpha) * soft(xb)
        if free:
            xf = C.synthesize(free, shape, g, s.candidates, deform_p=s.deform_p, cutmix_p=s.cutmix_p)
            xb, tgt = torch.cat([xb, xf]), torch.cat([tgt, soft(xf)])
        loss = -(tgt * F.log_softmax(st(xb), 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    st.eval()
    pred = predict(st, test.x).argmax(1)
    ens = torch.stack([predict(m, test.x) for m in team]).mean(0).argmax(1)
    return {"members": acc, "ensemble_acc": _pct(ens, test.y), "test_acc": _pct(pred, test.y),
            "fidelity": _pct(pred, t_pred), "queries": 0, "budget": n,
            "settings": {"alpha": alpha, "free": free}}


def stats(test) -> None:
    """Brightness of real test images and of each candidate kind (2,000 of each, no query)."""
    def row(name, z):
        fg = z > 0.1
        level = (z * fg).sum((1, 2, 3)) / fg.float().sum((1, 2, 3)).clamp_min(1)
        print(f"{name:10s} mean pixel {z.mean():.3f}  foreground share {fg.float().mean():.3f}  "
              f"foreground level {level.mean():.3f}  brightest pixel {z.amax((1, 2, 3)).mean():.3f}")
    row("real test", test.x)
    g = generator(0, "priors", "stats")
    row("mix", C.synthesize(2000, tuple(test.x.shape[1:]), g, BudgetSettings().candidates))
    for k, fn in {**C.GENERATORS, "parts": parts}.items():
        row(k, fn(2000, tuple(test.x.shape[1:]), g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", help="the prototype's name in the records (required but with --stats)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--budget", type=int, default=10000)
    ap.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    ap.add_argument("--stretch", type=float, default=0.0, help="share of candidates stretched to a brightest "
                    "pixel of 1")
    ap.add_argument("--parts", type=float, default=0.0, help="weight of the prototype 'parts' kind in the mix")
    ap.add_argument("--ensemble-of", type=Path, help="a finished run's work directory: train fresh students only")
    ap.add_argument("--distill", type=float, metavar="ALPHA", help="with --ensemble-of: distil one student from "
                    "the ensemble, ALPHA the teacher label's weight in the target")
    ap.add_argument("--free", type=int, default=0, help="with --distill: free candidates per batch")
    ap.add_argument("--stats", action="store_true", help="only print the brightness of real images and candidates")
    ap.add_argument("--teacher-dir", default="runs/bench-teachers")
    ap.add_argument("--out", type=Path, default=Path("docs/results/priors.json"))
    a = ap.parse_args()
    command = " ".join(["python benchmarks/priors.py", *sys.argv[1:]])
    if torch.get_num_threads() == 1:
        command = "OMP_NUM_THREADS=1 " + command
    data, _, _, student = DATASETS[a.dataset]
    if a.stats:
        return stats(data.load("test"))
    if not a.tag:
        ap.error("--tag is required (the prototype's name in the records)")
    teacher = teacher_for(a.dataset, Path(a.teacher_dir))
    test = data.load("test")
    t_pred = TorchOracle.from_file(teacher)(test.x)
    ident = teacher_identity(teacher, float((t_pred == test.y).float().mean() * 100))
    if a.ensemble_of is not None:
        t0 = time.perf_counter()
        found = (ensemble(a.ensemble_of, a.seeds, a.dataset, test, t_pred) if a.distill is None else
                 distill(a.ensemble_of, a.seeds, a.dataset, test, t_pred, a.distill, a.free))
        rec = {"dataset": a.dataset, "method": a.tag, "seed": 0, **found}
        rec.update(wall_s=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads(), command=command, **ident)
        print(json.dumps(rec), flush=True)
        save_cell(a.out, rec, command)
        return
    if a.parts:
        C.GENERATORS["parts"] = parts
    if a.stretch:
        C.synthesize, C.mutate = stretched(C.synthesize, a.stretch), stretched(C.mutate, a.stretch)
    s = BudgetSettings(candidates={**BudgetSettings().candidates, **({"parts": a.parts} if a.parts else {})})
    for seed in a.seeds:
        oracle = TorchOracle.from_file(teacher, budget=a.budget)
        t0 = time.perf_counter()
        res = train_budgeted(oracle, student, a.budget, s, seed=seed)
        pred = predict(res.student, test.x).argmax(1)
        rec = {"dataset": a.dataset, "method": a.tag, "budget": a.budget, "seed": seed, "queries": oracle.queries,
               "test_acc": round(float((pred == test.y).float().mean() * 100), 2),
               "fidelity": round(float((pred == t_pred).float().mean() * 100), 2),
               "teacher_counts": torch.bincount(res.y, minlength=oracle.num_classes).tolist(),
               "settings": {"stretch": a.stretch, "parts": a.parts},
               "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(), "command": command,
               **ident}
        assert oracle.queries <= a.budget, rec
        print(json.dumps(rec), flush=True)
        save_cell(a.out, rec, command)


if __name__ == "__main__":
    main()
