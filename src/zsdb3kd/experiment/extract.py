"""The budgeted student as a job (``zsdb3kd extract``) and as rows of a run file
(``budgeted@N``, ``budgeted-pool@N``, ``random@N``).

Before the first query: the teacher file, its input shape against the data, the student
built and run on that shape, the pool (real unlabelled training images, when asked for)
and the budget against ``--query-budget``. The test split is read once, after the student
is final, to report its accuracy; nothing selects on it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch

from ..budget import BudgetSettings, build_student, plan_rounds, train_budgeted
from ..budget.candidates import synthesize
from ..budget.train import planned_steps, seconds_per_step
from ..data import DataSettings, ImageSet
from ..distill import accuracy
from ..models import on_device
from ..oracle import LabelOracle, TeacherSpec, load_oracle
from ..parallel import all_gather, is_main, split_budget
from ..settings import ConfigError, content_key
from ..store import environment, write_json
from ..weights import save_weights
from .jobs import check_plan, duration

log = logging.getLogger("zsdb3kd")

#: the ``random`` baseline: one round of smooth random images, every ingredient off (see :func:`recipe`)
RANDOM = {"rounds": 0, "candidates": {"smooth": 1.0}, "deform_p": 0.0, "cutmix_p": 0.0, "class_balance": False,
          "balanced_sampling": False, "augment_labelled": 0.0, "mixup": 0.0}


def recipe(kind: str, settings: BudgetSettings) -> BudgetSettings:
    """The settings of a row kind: ``budgeted`` and ``budgeted-pool`` as given; ``random``
    with every ingredient off and as many training steps as the budgeted student takes over
    all its rounds (so the comparison is about which images are asked, not training length)."""
    if kind != "random":
        return settings
    scale = 1_000_000  # round shares, budget-independent up to rounding
    earlier = list(accumulate(plan_rounds(scale, settings.rounds, settings.init_fraction)))[:-1]
    extra = settings.epochs_per_round * sum(earlier) / scale
    return settings.replace(**RANDOM, final_epochs=round(settings.final_epochs + extra, 2))


class RoundLog:
    """Logs each round: queries so far, held-out agreement, time, and the time left. The time
    left is the latest round's pace applied to the rounds still to run: its training seconds per
    image-epoch times their image-epochs, plus its choosing-and-asking seconds per query times
    their queries. One round's pace, not the run's average, so a slow start (a GPU's warm-up, a
    resumed run's loading) is not extrapolated to the end."""

    def __init__(self, what: str, budget: int, settings: BudgetSettings) -> None:
        self.what, self.budget, self.t0 = what, budget, time.perf_counter()
        self.plan = plan_rounds(budget, settings.rounds, settings.init_fraction)
        epochs = [settings.epochs_per_round] * (len(self.plan) - 1) + [settings.final_epochs]
        self.train_work = [n * e for n, e in zip(accumulate(self.plan), epochs)]  # image-epochs per round

    def seconds_left(self, entry: dict) -> float:
        """The estimate after round ``entry["round"]``, from that round's ``train_s`` and ``choose_s``."""
        r = entry["round"]
        train_pace = entry["train_s"] / max(self.train_work[r], 1)
        choose_pace = entry["choose_s"] / max(self.plan[r], 1)
        return sum(train_pace * w + choose_pace * q for w, q in zip(self.train_work[r + 1:], self.plan[r + 1:]))

    def __call__(self, entry: dict, rounds: int) -> None:
        r, spent = entry["round"], entry["total_queries"]
        elapsed = time.perf_counter() - self.t0
        eta = f", ~{self.seconds_left(entry):.0f} s left" if r + 1 < len(self.plan) else ""
        agree = entry["agreement_held_out"]
        log.info(f"{self.what}: round {r + 1}/{rounds}: {spent:,}/{self.budget:,} queries, held-out "
                 f"agreement {'-' if agree is None else f'{agree:.1f}%'}, {elapsed:.0f} s{eta}")


def check_inputs(oracle: LabelOracle, student: str, data: ImageSet | None, pool: ImageSet | None, budget: int) -> None:
    """Everything that can fail, checked before the first query."""
    shape = tuple(oracle.input_shape)
    for what, images in (("test images", data), ("pool images", pool)):
        if images is not None and tuple(images.x.shape[1:]) != shape:
            raise ConfigError(f"{what} have shape {tuple(images.x.shape[1:])}, the teacher takes {shape}")
    build_student(student, oracle.num_classes, shape, 0)
    if pool is not None and len(pool) < budget:
        raise ConfigError(f"the pool has {len(pool):,} images, fewer than the budget of {budget:,} queries")


def training_plan(student: str, oracle: LabelOracle, budget: int, settings: BudgetSettings, device: str,
                  pool: ImageSet | None) -> str:
    """The plan's training, in words: its steps and their time on this machine, from a few steps
    of a throwaway student timed on images like the run's (fresh candidates, or the pool's first
    images; no query): the students' training is most of a run's time."""
    steps = planned_steps(plan_rounds(budget, settings.rounds, settings.init_fraction), settings)
    shape = tuple(oracle.input_shape)
    n = 4 * settings.batch_size
    x = pool.x[:n] if pool is not None else synthesize(n, shape, torch.Generator().manual_seed(0),
                                                        settings.candidates, deform_p=settings.deform_p,
                                                        cutmix_p=settings.cutmix_p)
    throwaway = on_device(build_student(student, oracle.num_classes, shape, 0), device)
    pace = seconds_per_step(throwaway, x, oracle.num_classes, settings, torch.device(device))
    return (f"; recipe {settings.recipe}, about {steps:,} training steps, {duration(steps * pace)} here at "
            f"{pace * 1000:.1f} ms each")


def extract_job(teacher: TeacherSpec, student: str, budget: int, out: str | os.PathLike, *,
                settings: BudgetSettings | None = None, data: DataSettings | None = None, pool: bool = False,
                evaluate: bool = True, seed: int = 0, work_dir: str | os.PathLike | None = None, device: str = "cpu",
                query_budget: int | None = None, plan_only: bool = False) -> dict[str, Any]:
    """The best ``student`` for ``budget`` queries to ``teacher``, saved at ``out`` with its
    metrics beside it (``<out>.json``). ``pool``: the training split of ``data`` is the
    candidate pool (its labels are never read). ``work_dir`` (default ``<out>.work``) keeps
    every answered query and the student after each round: rerun to resume."""
    settings = settings or BudgetSettings()
    if budget < 1:
        raise ConfigError(f"--budget must be at least 1 query, got {budget}")
    teacher.check()
    oracle = load_oracle(teacher, device=device, budget=split_budget(query_budget))
    if pool and data is None:
        raise ConfigError("--pool train needs --data (whose training images become the pool)")
    images = data.load("train") if pool else None  # labels never read: the pool is images only
    check_inputs(oracle, student, None, images, budget)
    settings = settings.for_input(oracle.input_shape)
    if data is not None and evaluate:  # what can be known of the test split without reading it
        data.check_readable()
        known, want = data.image_shape("test"), tuple(oracle.input_shape)
        if known is not None and (known[1:] != want[1:] or known[0] not in (None, want[0])):
            shown = "x".join("?" if v is None else str(v) for v in known)
            raise ConfigError(f"{data.name} test images are {shown} (C x H x W), the teacher takes "
                              f"{'x'.join(map(str, want))}: pass --data (and --data-root) for the teacher's own test "
                              "images, or --no-evaluate")
    check_plan(f"extract {student} ({'real unlabelled pool' if pool else 'zero-shot'})", budget, query_budget,
               plan_only, also=training_plan(student, oracle, budget, settings, device, images))
    work = Path(work_dir) if work_dir is not None else Path(f"{out}.work")
    res = train_budgeted(oracle, student, budget, settings, seed=seed, pool=None if images is None else images.x,
                         work_dir=work, device=device, progress=RoundLog("extract", budget, settings))
    metrics: dict[str, Any] = {"student": student, "budget": budget, "queries": res.queries,
                               "paid_this_run": res.paid, "paid_per_rank": all_gather(oracle.queries),
                               "pool": bool(pool), "seed": seed,
                               "agreement_held_out": res.log[-1]["agreement_held_out"],
                               "settings": settings.model_dump(mode="json"), "rounds": res.log,
                               "environment": environment()}
    if is_main():
        save_weights(res.student, out, arch=student, input_shape=tuple(oracle.input_shape),
                     num_classes=oracle.num_classes,
                     extra={"method": "budgeted-pool" if pool else "budgeted", "teacher_queries": str(res.queries)})
        write_json(Path(f"{out}.json"), metrics)
    if data is not None and evaluate:  # the test split is read once, after the student is final and saved
        test = data.load("test")
        check_inputs(oracle, student, test, None, budget)
        metrics["test_acc"] = accuracy(res.student, test.x, test.y, device=device)
        if is_main():
            write_json(Path(f"{out}.json"), metrics)
    return metrics


def budgeted_row(kind: str, budget: int, oracle: LabelOracle, student: str, settings: BudgetSettings, seed: int,
                 run: Path, teacher_sha: str, test: ImageSet, pool: ImageSet | None, device: str,
                 key_parts: list) -> dict[str, Any]:
    """One report row of a run file: trained (or resumed, or reused) in ``run``."""
    s = recipe(kind, settings.for_input(oracle.input_shape))
    key = content_key("budgeted", kind, budget, student, s.key(), seed, teacher_sha, *key_parts, length=12)
    work = run / f"{kind}-{budget}-{key}"
    done = work / "metrics.json"
    if done.exists():
        log.info(f"student[{kind}@{budget}]: reusing {work.name}")
        return {**json.loads(done.read_text()), "reused": True}
    log.info(f"student[{kind}@{budget}]: {budget:,} queries in {s.rounds + 1} round(s)")
    t0 = time.perf_counter()
    res = train_budgeted(oracle, student, budget, s, seed=seed, pool=None if pool is None else pool.x, work_dir=work,
                         device=device, progress=RoundLog(f"student[{kind}@{budget}]", budget, s))
    labels = {"budgeted": "budgeted student (synthetic images, no real data)",
              "budgeted-pool": "budgeted student (real unlabelled images as the pool)",
              "random": "random smooth images, hard labels (every ingredient off, same training steps)"}
    row = {"label": labels[kind], "queries_per_pair": 0, "total_queries": res.queries,
           "val_acc": res.log[-1]["agreement_held_out"], "test_acc": accuracy(res.student, test.x, test.y,
                                                                              device=device),
           "train_time_s": round(time.perf_counter() - t0, 1)}
    if is_main():
        save_weights(res.student, work / "student.safetensors", arch=student, input_shape=tuple(test.x.shape[1:]),
                     num_classes=oracle.num_classes, extra={"method": f"{kind}@{budget}"})
        write_json(done, row)
    log.info(f"student[{kind}@{budget}]: held-out agreement {row['val_acc']:.2f}%  test {row['test_acc']:.2f}%")
    return row
