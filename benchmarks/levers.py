"""Prototypes of levers for the zero-shot budgeted student, measured against its recipe (their
findings: docs/budget.md, their table: docs/results/levers.md); none was adopted as a default
(mixup became an option: level on average over budgets).

    OMP_NUM_THREADS=1 python benchmarks/levers.py --tag gen-confident --gen-fraction 0.5 --steps 300 --seeds 0
    OMP_NUM_THREADS=1 python benchmarks/levers.py --tag train-affine --gen-fraction 0 --train-aug affine --seeds 0 1

Levers:

* **A generator trained against the student** (IDEAL / DFHL-RS style): after every round a
  fresh class-conditional conv generator ``G(z, c)`` is trained for ``--steps`` steps against
  the current student (free: no teacher query), either to make images the student files
  under ``c`` with confidence (``--target confident``) or images on its boundary, half sure
  of ``c`` (``--target boundary``); optional mode-seeking term (``--ms``) for diversity.
  ``--gen-fraction`` of each round's queries are then generator images, ``--gpool`` times as
  many generated and the most uncertain chosen (class-balanced by intended class); the rest
  of the round is the recipe's own choice.
* **Training-side levers** (free): a small random affine map on top of the one-pixel shift
  (``--train-aug affine --strength``), mixup between labelled images (``--mixup``: share of
  each batch), an exponential moving average of the weights over the final epochs (``--ema``).

Each cell is one run of the budgeted student with the lever on (everything else the default
recipe, ``mixup = 0``; ``train-mixup`` here is the package's ``mixup`` option), on the
benchmark's LeNet-5 teacher, scored on the test split once at the end; the
records go to ``--out`` (JSON) and ``python scripts/results_pages.py`` renders them beside the
recipe's own records of docs/results/budget.json for the same seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget import DATASETS, refuse_other_teacher, save_cell, teacher_for, teacher_identity  # noqa: E402

from zsdb3kd.budget import BudgetSettings  # noqa: E402
from zsdb3kd.budget import method as M  # noqa: E402
from zsdb3kd.budget.select import choose, predict, uncertainty  # noqa: E402
from zsdb3kd.budget.train import mix, shift  # noqa: E402
from zsdb3kd.budget.transforms import affine  # noqa: E402
from zsdb3kd.distill import accuracy  # noqa: E402
from zsdb3kd.oracle import TorchOracle  # noqa: E402
from zsdb3kd.store import derive_seed, generator  # noqa: E402


class Gen(nn.Module):
    """Class-conditional conv generator for any ``(C, H, W)``: two 2x upsampling stages from
    ``ceil(H/4) x ceil(W/4)``, resized to ``H x W``, sigmoid output."""

    def __init__(self, shape, k, nz=64, ngf=32):
        super().__init__()
        c, h, w = shape
        self.shape, self.nz, self.ngf = shape, nz, ngf
        self.h0, self.w0 = math.ceil(h / 4), math.ceil(w / 4)
        self.emb = nn.Embedding(k, nz)
        self.fc = nn.Linear(2 * nz, 2 * ngf * self.h0 * self.w0)
        self.net = nn.Sequential(
            nn.BatchNorm2d(2 * ngf), nn.Upsample(scale_factor=2), nn.Conv2d(2 * ngf, 2 * ngf, 3, padding=1),
            nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, padding=1), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, c, 3, padding=1))

    def forward(self, z, y):
        h = self.fc(torch.cat([z, self.emb(y)], 1)).view(z.shape[0], 2 * self.ngf, self.h0, self.w0)
        x = self.net(h)
        if x.shape[2:] != self.shape[1:]:
            x = F.interpolate(x, size=self.shape[1:], mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


def train_gen(student, shape, k, seed, r, steps, bs=128, lam_ms=0.0, target="confident", lr=1e-3):
    """A fresh generator trained against the frozen student (no query)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "geninit", r) % 2**31)
        G = Gen(shape, k)
    g = generator(seed, "gen", r)
    opt = torch.optim.Adam(G.parameters(), lr=lr, betas=(0.5, 0.999))
    student.eval()
    for p in student.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        z = torch.randn(bs, G.nz, generator=g)
        y = torch.randint(0, k, (bs,), generator=g)
        x = G(z, y)
        logits = student(x)
        if target == "confident":
            loss = F.cross_entropy(logits, y)
        else:  # boundary: half sure of y, the rest spread over the other classes
            t = torch.full((bs, k), 0.5 / (k - 1))
            t[torch.arange(bs), y] = 0.5
            loss = -(t * F.log_softmax(logits, 1)).sum(1).mean()
        if lam_ms:  # mode seeking: image distance over latent distance
            half = bs // 2
            dx = (x[:half] - x[half:2 * half]).abs().mean((1, 2, 3))
            dz = (z[:half] - z[half:2 * half]).abs().mean(1)
            loss = loss - lam_ms * (dx / dz).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in student.parameters():
        p.requires_grad_(True)
    G.eval()
    return G, g


#: every lever is measured against the default recipe (budget.json's ``budgeted``), mixup off
BASE = BudgetSettings(mixup=0.0)
TRAIN = {"aug": "shift", "strength": 0.3, "mixup": 0.0, "ema": 0.0}


def fit_with_levers(student, x, y, epochs, s, g, num_classes, device, cosine):
    """zsdb3kd.budget.train.fit with the training levers of ``TRAIN`` (same random stream
    otherwise; class-balanced batches as the recipe)."""
    n = x.shape[0]
    steps = int(math.ceil(epochs * n / s.batch_size)) if n else 0
    if steps == 0:
        return {"steps": 0}
    opt = torch.optim.Adam(student.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    weights = (1.0 / torch.bincount(y, minlength=num_classes).float().clamp_min(1))[y]
    ema = copy.deepcopy(student) if (TRAIN["ema"] and cosine) else None
    student.train()
    total = 0.0
    for step in range(steps):
        if cosine:
            for group in opt.param_groups:
                group["lr"] = s.lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.multinomial(weights, s.batch_size, replacement=True, generator=g)
        xb, yb = x[idx], y[idx]
        aug = torch.rand(xb.shape[0], generator=g) < s.augment_labelled
        xa = shift(xb, g) if TRAIN["aug"] == "shift" else affine(shift(xb, g), g, strength=TRAIN["strength"])
        xb = torch.where(aug[:, None, None, None], xa, xb)
        if TRAIN["mixup"] > 0:  # the package's mixup (the same random stream as when it was measured here)
            xb, t = mix(xb, yb, TRAIN["mixup"], num_classes, g)
        else:
            t = F.one_hot(yb, num_classes).float()
        loss = -(t * F.log_softmax(student(xb), 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for pe, ps in zip(ema.parameters(), student.parameters()):
                    pe.mul_(TRAIN["ema"]).add_(ps, alpha=1 - TRAIN["ema"])
        total += float(loss.detach())
    if ema is not None:
        student.load_state_dict(ema.state_dict())
    student.eval()
    return {"steps": steps, "loss": round(total / steps, 4)}


class GenRun(M._Run):
    """The budgeted run with a share of each later round's queries made by a generator."""

    opts: dict = {}

    def choose_queries(self, r, q):
        o = self.opts
        if r == 0 or o["gen_fraction"] == 0:
            return super().choose_queries(r, q)
        n_gen = int(round(q * o["gen_fraction"]))
        G, g = train_gen(self.student, self.shape, self.k, self.seed, r, o["steps"], lam_ms=o["ms"],
                         target=o["target"])
        with torch.no_grad():
            m = n_gen * o["gpool"]
            y = torch.arange(m) % self.k
            xg = torch.cat([G(torch.randn(min(1024, m - i), G.nz, generator=g), y[i:i + 1024])
                            for i in range(0, m, 1024)])
        xg = M._f32(M._u8(xg))
        if o["gpool"] > 1:  # the most uncertain, balanced over the intended classes
            p = predict(self.student, xg)
            xg = xg[choose(uncertainty(p, "margin"), y, n_gen, self.k, generator(self.seed, "gch", r), explore=2.0)]
        x, pidx = super().choose_queries(r, q - n_gen)
        return torch.cat([x, xg]), torch.cat([pidx, torch.full((n_gen,), -1, dtype=torch.long)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tag", required=True, help="the lever's name in the records")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--budget", type=int, default=10000)
    ap.add_argument("--dataset", default="fashion-mnist", choices=["fashion-mnist", "mnist"])
    ap.add_argument("--gen-fraction", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--ms", type=float, default=0.0)
    ap.add_argument("--gpool", type=int, default=1)
    ap.add_argument("--target", default="confident", choices=["confident", "boundary"])
    ap.add_argument("--train-aug", default=None, choices=["shift", "affine"])
    ap.add_argument("--strength", type=float, default=0.3)
    ap.add_argument("--mixup", type=float, default=0.0)
    ap.add_argument("--ema", type=float, default=0.0)
    ap.add_argument("--teacher-dir", default="runs/bench-teachers")
    ap.add_argument("--out", default="docs/results/levers.json")
    a = ap.parse_args()
    GenRun.opts = {"gen_fraction": a.gen_fraction, "steps": a.steps, "ms": a.ms, "gpool": a.gpool, "target": a.target}
    if a.train_aug or a.mixup or a.ema:
        TRAIN.update(aug=a.train_aug or "shift", strength=a.strength, mixup=a.mixup, ema=a.ema)
        M.fit = fit_with_levers
    command = "OMP_NUM_THREADS=1 python benchmarks/levers.py " + " ".join(sys.argv[1:])
    data, _, _, student = DATASETS[a.dataset]
    teacher = teacher_for(a.dataset, Path(a.teacher_dir))
    test = data.load("test")
    t_pred = TorchOracle.from_file(teacher)(test.x)
    ident = teacher_identity(teacher, float((t_pred == test.y).float().mean() * 100))
    if Path(a.out).exists():
        refuse_other_teacher(json.loads(Path(a.out).read_text()), a.dataset, ident, Path(a.out))
    for seed in a.seeds:
        oracle = TorchOracle.from_file(teacher, budget=a.budget)
        t0 = time.perf_counter()
        res = GenRun(oracle, student, a.budget, BASE, seed, None, None, "cpu", None).run()
        pred = predict(res.student, test.x).argmax(1)
        rec = {"dataset": a.dataset, "method": a.tag, "budget": a.budget, "seed": seed, "queries": oracle.queries,
               "test_acc": round(accuracy(res.student, test.x, test.y), 2),
               "fidelity": round(float((pred == t_pred).float().mean() * 100), 2),
               "teacher_counts": torch.bincount(res.y, minlength=oracle.num_classes).tolist(),
               "generator": GenRun.opts if a.gen_fraction else None,
               "training": dict(TRAIN) if M.fit is fit_with_levers else None,
               "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads(), "command": command,
               **ident}
        assert oracle.queries <= a.budget, rec
        print(json.dumps(rec), flush=True)
        save_cell(Path(a.out), rec, command)


if __name__ == "__main__":
    main()
