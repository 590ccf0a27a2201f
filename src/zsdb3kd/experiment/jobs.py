"""The library call behind each single-stage command (``robustness``, ``distill``, ...).

Each job takes typed settings, checks everything it can before the first query (files,
shapes, the student architecture, the planned queries against the budget) and says what
it plans to spend; the command line only parses flags and prints the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..data import DataSettings, choose_subset, train_val_split
from ..distill import TrainSettings
from ..oracle import LabelOracle, TeacherSpec, load_oracle, teacher_logits, teacher_sha256
from ..parallel import is_main, label_sharded, split_budget
from ..robustness import CandidatePool, RobustnessResult, RobustnessSettings, compute_to_file
from ..settings import ConfigError
from ..softlabels import load_soft_labels
from .stages import check_buildable, distill_student

log = logging.getLogger("zsdb3kd")

#: a plan above this many queries, with no explicit budget, is refused: at the ~8,000 queries/s
#: a LeNet-5 answers on two cores it is about 20 minutes, and a paid API bills every one
CONFIRM_ABOVE = 10_000_000
#: the rate used to turn a plan into a time estimate
TYPICAL_RATE = 8_000


class PlanOnly(Exception):
    """Raised by a job asked for its plan only (``--plan``); carries the plan's text."""


def duration(seconds: float) -> str:
    """``seconds`` in words: "about 2.5 h", "about 7 min", "under a minute"."""
    return (f"about {seconds / 3600:.1f} h" if seconds >= 3600 else f"about {round(seconds / 60)} min"
            if seconds >= 60 else "under a minute")


def check_plan(what: str, planned: int, query_budget: int | None, plan_only: bool, also: str = "") -> None:
    """Log (or, with ``plan_only``, raise :class:`PlanOnly` with) the planned queries (and
    ``also``, more of the plan); refuse a plan the budget cannot cover, or a huge one nobody
    confirmed, before anything is spent."""
    when = duration(planned / TYPICAL_RATE)
    text = f"{what}: at most {planned:,} teacher queries ({when} at ~{TYPICAL_RATE:,} queries/s){also}"
    if plan_only:
        raise PlanOnly(text)
    if query_budget is not None and planned > query_budget:
        raise ConfigError(f"{what} may spend up to {planned:,} queries, more than --query-budget {query_budget:,}; "
                          "raise the budget or lower the work (--subset, --queries-per-pair); nothing was spent")
    if query_budget is None and planned > CONFIRM_ABOVE:
        raise ConfigError(f"{what} may spend up to {planned:,} queries ({when}); confirm with --query-budget "
                          f"{planned} or lower the work (--subset, --queries-per-pair); nothing was spent")
    if planned:  # a job that asks nothing says nothing; its own errors come first
        log.info(f"plan: {text}")


@dataclass
class Samples:
    """The samples a job works on and the pool of initial directions."""

    x: torch.Tensor
    indices: torch.Tensor
    pool: CandidatePool
    name: str
    split: str


def samples_for(data: DataSettings, seed: int, split: Literal["train", "test"] = "train", subset: int | None = None,
                pseudo: str | None = None) -> Samples:
    """Real samples (``split`` of ``data``, after the validation split) or, zero-shot, the
    pseudo samples of a ``synthesize`` file (no real data is read)."""
    if pseudo:
        from ..synthesis import PseudoSamples

        ps = PseudoSamples.load(pseudo)
        idx = choose_subset(len(ps.y), subset, seed) if subset is not None else torch.arange(len(ps.y))
        return Samples(ps.x[idx], idx, CandidatePool(ps.x, ps.y), f"pseudo:{pseudo}", "pseudo")
    splits = data.splits(seed)
    src = splits.train if split == "train" else splits.test
    idx = choose_subset(len(src), subset, seed) if subset is not None else torch.arange(len(src))
    return Samples(src.x[idx], idx, CandidatePool(splits.train.x, splits.train.y), src.name, split)


def robustness_job(teacher: TeacherSpec, settings: RobustnessSettings, samples: Samples, out: str | os.PathLike, *,
                   device: str = "cpu", query_budget: int | None = None, plan_only: bool = False,
                   progress: bool | None = None) -> RobustnessResult:
    """Boundary distances of ``samples`` to every other class, into ``out`` (resumable). Under
    torchrun each rank gets its share of ``query_budget`` and rank 0 alone writes ``out``."""
    teacher.check()
    oracle = load_oracle(teacher, device=device, budget=split_budget(query_budget))
    if tuple(samples.x.shape[1:]) != oracle.input_shape:
        raise ConfigError(f"samples have shape {tuple(samples.x.shape[1:])}, the teacher takes {oracle.input_shape}")
    planned = settings.max_queries(len(samples.x), oracle.num_classes)
    check_plan(f"robustness of {len(samples.x):,} samples x {oracle.num_classes - 1} targets", planned, query_budget,
               plan_only)
    pool = CandidatePool(samples.pool.flat.view(-1, *oracle.input_shape).to(device), samples.pool.y.to(device))
    return compute_to_file(out, oracle, samples.x.to(device), settings, pool=pool, indices=samples.indices,
                           progress=progress if is_main() else False,
                           provenance={"teacher": teacher.path, "teacher_sha256": teacher_sha256(teacher, oracle),
                                       "data": samples.name, "split": samples.split})


def read_soft_labels(robustness: str | None, soft_labels: str | None, at_queries: int | None
                     ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(logits, indices, provenance)`` from a robustness file (at ``at_queries`` per pair) or a
    soft-label file."""
    if bool(robustness) == bool(soft_labels):
        raise ConfigError("give the soft labels as exactly one of --robustness FILE or --soft-labels FILE")
    if soft_labels:
        logits, idx, _, prov = load_soft_labels(soft_labels)
        return logits, idx, prov
    res = RobustnessResult.load(robustness)
    return res.logits(at_queries), res.indices, res.provenance


def distill_job(teacher: TeacherSpec, method: Literal["ce", "whitebox-kd", "soft"], data: DataSettings, student: str,
                train: TrainSettings, out: str | os.PathLike, *, seed: int = 0, subset: int | None = None,
                robustness: str | None = None, soft_labels: str | None = None, at_queries: int | None = None,
                pseudo: str | None = None, val_fraction: float = 0.1, device: str = "cpu",
                query_budget: int | None = None, plan_only: bool = False,
                progress: bool | None = None) -> dict[str, Any]:
    """A student from the teacher's hard labels (``ce``), its real logits (``whitebox-kd``, a
    reference, not label-only) or boundary-distance soft labels (``soft``); on real training images, or,
    with ``pseudo``, on pseudo samples (only the real test split is read). Only ``ce`` asks
    the teacher anything: one label per training image."""
    teacher.check()
    if method != "ce" or pseudo:
        check_plan(f"distill --method {method}", 0, query_budget, plan_only)
    if pseudo:
        return _distill_pseudo(teacher, method, data, student, train, out, seed, robustness, soft_labels, at_queries,
                               pseudo, val_fraction, device, progress)
    splits = data.splits(seed)
    check_buildable(student, splits.train.shape, len(splits.train.classes), "student architecture")
    tl = None
    if method == "soft":
        tl, idx, prov = read_soft_labels(robustness, soft_labels, at_queries)
        if prov.get("split", "train") != "train" or int(idx.max()) >= len(splits.train):
            raise ConfigError(f"{robustness or soft_labels} does not index this training split "
                              "(same --data, --val-size and --seed?)")
    else:
        idx = choose_subset(len(splits.train), subset, seed) if subset is not None else torch.arange(len(splits.train))
    sub = splits.train.subset(idx)
    y = sub.y
    if method == "ce":
        check_plan(f"labels of {len(sub):,} training images", len(sub), query_budget, plan_only)
    if method == "ce":  # under torchrun each image is asked once, by one rank
        y = label_sharded(load_oracle(teacher, device=device), sub.x.to(device)).cpu()
    elif method == "whitebox-kd":
        tl = teacher_logits(teacher, sub.x, device)
    return distill_student(student, sub.x, y, (splits.val.x, splits.val.y), (splits.test.x, splits.test.y), train,
                           out, seed=seed, teacher_logits=tl, num_classes=len(splits.train.classes), device=device,
                           desc=f"student[{method}]", progress=progress, extra={"method": method})


def _distill_pseudo(teacher, method, data, student, train, out, seed, robustness, soft_labels, at_queries, pseudo,
                    val_fraction, device, progress) -> dict[str, Any]:
    from ..synthesis import PseudoSamples

    if method == "whitebox-kd":
        raise ConfigError("--pseudo supports --method soft or ce")
    ps = PseudoSamples.load(pseudo)
    test = data.load("test")
    check_buildable(student, test.shape, len(test.classes), "student architecture")
    tr, va = train_val_split(ps.y, val_fraction, seed)
    tl = None
    if method == "soft":
        z, idx, prov = read_soft_labels(robustness, soft_labels, at_queries)
        if prov.get("split") != "pseudo":
            raise ConfigError(f"{robustness or soft_labels} was not computed on pseudo samples ('robustness --pseudo')")
        logits = torch.zeros(len(ps.y), z.shape[1])
        have = torch.zeros(len(ps.y), dtype=torch.bool)
        logits[idx], have[idx] = z, True
        tr = tr[have[tr]]
        tl = logits[tr]
    return distill_student(student, ps.x[tr], ps.y[tr], (ps.x[va], ps.y[va]), (test.x, test.y), train, out,
                           seed=seed, teacher_logits=tl, num_classes=len(test.classes), device=device,
                           desc=f"student[zero-shot {method}]", progress=progress,
                           extra={"method": f"zero-shot-{method}"})


def random_job(teacher: TeacherSpec, data: DataSettings, student: str, train: TrainSettings, out: str | os.PathLike,
               *, kind: str = "smooth", samples: int = 1_000_000, val: int = 10_000, seed: int = 0,
               labels_dir: str | None = None, device: str = "cpu", query_budget: int | None = None,
               plan_only: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """A zero-shot student on random images labelled by the teacher, one query each (only the
    test split is read). The labels are kept, so a rerun asks the teacher nothing again."""
    from ..synthesis import label_random_images

    if not 1 <= val < samples:
        raise ConfigError(f"need 1 <= --random-val < --random-samples, got {val}, {samples}")
    teacher.check()
    oracle: LabelOracle = load_oracle(teacher, device=device, budget=split_budget(query_budget))
    test = data.load("test")
    if tuple(test.x.shape[1:]) != tuple(oracle.input_shape):
        raise ConfigError(f"test images have shape {tuple(test.x.shape[1:])}, the teacher takes {oracle.input_shape}")
    check_buildable(student, oracle.input_shape, oracle.num_classes, "student architecture")
    check_plan(f"labels of {samples:,} random images", samples, query_budget, plan_only)
    x, y = label_random_images(oracle, kind, samples, seed, device=device, work_dir=labels_dir or f"{out}.labels",
                               progress=progress if is_main() else False)
    n = samples - val
    m = distill_student(student, x[:n], y[:n], (x[n:], y[n:]), (test.x, test.y), train, out, seed=seed,
                        num_classes=len(test.classes), device=device, desc="student[random]", progress=progress,
                        extra={"method": f"random-{kind}", "teacher_queries": str(oracle.queries)})
    return {**m, "new_queries": oracle.queries, "train_images": n}


def evaluate_job(model: TeacherSpec, data: DataSettings, device: str = "cpu") -> float:
    """Test accuracy (%) of a model file, ONNX model or label server on ``data``'s test split."""
    model.check()
    test = data.load("test")
    oracle = load_oracle(model, device=device)
    if tuple(test.x.shape[1:]) != tuple(oracle.input_shape):
        raise ConfigError(f"test images have shape {tuple(test.x.shape[1:])}, the model takes {oracle.input_shape}")
    check_plan(f"labels of {len(test):,} test images", len(test), None, False)
    return float((oracle(test.x.to(device)).cpu() == test.y).float().mean() * 100)


def synthesize_job(teacher: TeacherSpec, settings, out: str | os.PathLike, *, device: str = "cpu",
                   query_budget: int | None = None, plan_only: bool = False, progress: bool | None = None):
    """Pseudo samples (ZSDB3KD) into ``out``; ``<out>.parts`` keeps the finished chunks. Under
    torchrun each rank gets its share of ``query_budget`` and rank 0 alone writes ``out``."""
    from ..synthesis import synthesize_to_file

    teacher.check()
    oracle = load_oracle(teacher, device=device, budget=split_budget(query_budget))
    check_plan(f"synthesis of {settings.per_class * oracle.num_classes:,} pseudo samples",
               settings.max_queries(oracle.num_classes), query_budget, plan_only)
    return synthesize_to_file(out, oracle, settings, device=device, progress=progress if is_main() else False)
