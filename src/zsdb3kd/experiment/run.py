"""A whole experiment: ``teacher -> [synthesis] -> soft labels -> students -> report``.

:func:`run_experiment` first checks everything that can be checked without a query (the
data, the teacher file, the student architecture on the input shape, the planned queries
against ``query_budget``), then runs the stages of :mod:`.stages`, reusing every finished
one. The resolved configuration is written into the run directory; a directory that holds
a *different* configuration is refused rather than overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..data import ImageSet, choose_subset, train_val_split
from ..distill import TrainSettings
from ..oracle import HttpOracle, load_oracle, teacher_logits
from ..parallel import is_main, label_sharded, split_budget
from ..robustness import CandidatePool, RobustnessResult
from ..settings import ConfigError, content_key, validate
from ..store import environment, generator, write_json
from .config import BUDGETED, RunConfig, load_config, needs_pseudo_samples, parse_student_method
from .extract import budgeted_row
from .plan import format_plan, plan_queries, planned_total, robustness_settings, synthesis_settings
from .report import write_report
from .stages import (check_buildable, oracle_accuracy, robustness_stage, soft_row, student_row, teacher_key,
                     train_teacher)

log = logging.getLogger("zsdb3kd")


def plan_experiment(config: RunConfig | str | os.PathLike) -> tuple[RunConfig, list[dict[str, Any]]]:
    """Validate a config and plan its queries without running anything."""
    cfg = _config(config)
    test = cfg.data.load("test")
    check_buildable(cfg.student.arch, test.shape, len(test.classes), "student architecture")
    if not cfg.teacher.path:
        check_buildable(cfg.teacher.arch, test.shape, len(test.classes), "teacher architecture")
    else:
        cfg.teacher.spec(cfg.teacher.path).check()
    return cfg, plan_queries(cfg, len(test.classes), len(test))


def _config(config: RunConfig | str | os.PathLike) -> RunConfig:
    return validate(RunConfig, config) if isinstance(config, (RunConfig, dict)) else load_config(config)


def _same_config(old: Any, new: Any) -> bool:
    return json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True)


def _prepare_run(cfg: RunConfig, run_dir, force: bool) -> Path:
    run = Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    run.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump(mode="json")
    stamp = run / "config.resolved.json"
    if stamp.exists() and not force and not _same_config(json.loads(stamp.read_text()), resolved):
        raise ConfigError(f"{run} holds a run with a different configuration ({stamp}); choose another run directory "
                          "or pass --force to replace its report (finished stages are still reused by content)")
    write_json(stamp, resolved)
    return run


def run_experiment(config: RunConfig | str | os.PathLike, run_dir: str | os.PathLike | None = None, *,
                   progress: bool | None = None, force: bool = False) -> dict[str, Any]:
    """Run (or resume) an experiment (``mode`` db3kd or zero-shot); writes and returns the report."""
    cfg, plan = plan_experiment(config)
    worst = planned_total(plan)
    log.info("teacher queries per stage, at most:\n" + format_plan(cfg, plan))
    if cfg.query_budget is not None and worst > cfg.query_budget:
        raise ConfigError(f"a fresh run may spend up to {worst:,} teacher queries, more than query_budget "
                          f"({cfg.query_budget:,}); raise query_budget or lower the stages' queries (see the plan "
                          "above); nothing was spent")
    run = _prepare_run(cfg, run_dir, force)
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    teacher, teacher_metrics = _stage_teacher(cfg, run, progress)
    teacher_sha = teacher_key(teacher)
    mode = _run_zero_shot if cfg.mode == "zero-shot" else _run_db3kd
    report, extras = mode(cfg, run, teacher, teacher_sha, teacher_metrics, progress)
    report["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    report["stages"] = stage_summary(report)
    report["environment"] = environment()
    if is_main():
        write_report(run, report, extras)
    return report


def _stage_teacher(cfg: RunConfig, run: Path, progress) -> tuple[str, dict[str, Any]]:
    """The teacher: given (``teacher.path``, a file or the URL of a label server) or trained
    here on the real training data (the model owner's job: the only stage that may read
    the training data in a zero-shot run)."""
    t = cfg.teacher
    if t.path:
        return t.path, {"path": t.path}
    splits = cfg.data.splits(cfg.seed)
    tcfg = _training(cfg.teacher)
    skey = content_key("teacher", splits.fingerprint, t.arch, tcfg.key(), cfg.seed, length=12)
    path = run / f"teacher-{t.arch}-{skey}.safetensors"
    mpath = path.with_suffix(".json")
    if path.exists() and mpath.exists():
        log.info(f"teacher: reusing {path.name}")
        return str(path), {**json.loads(mpath.read_text()), "reused": True}
    log.info(f"teacher: training {t.arch} for {t.epochs} epochs")
    metrics = train_teacher(splits, t.arch, path, tcfg, seed=cfg.seed, device=cfg.device, progress=progress)
    metrics["environment"] = environment()
    write_json(mpath, metrics)
    return str(path), metrics


def _training(section) -> TrainSettings:
    """The training settings of a ``[teacher]`` or ``[student]`` section (its other keys do not
    change the trained weights, so they stay out of the artifact keys)."""
    return TrainSettings(**section.model_dump(include=set(TrainSettings.model_fields)))


def _open(cfg: RunConfig, teacher: str, budget: int | None = None):
    """The teacher as a label-only oracle; under torchrun with this rank's share of ``budget``."""
    return load_oracle(cfg.teacher.spec(teacher), device=cfg.device, budget=split_budget(budget))


def _teacher_test_acc(cfg: RunConfig, teacher: str, test: ImageSet, metrics: dict[str, Any]) -> float:
    if "test_acc" in metrics:
        return float(metrics["test_acc"])
    # a given teacher: measured once with a separate, uncounted oracle so the run's budget is untouched
    oracle = _open(cfg, teacher)
    if tuple(oracle.input_shape) != test.shape:
        raise ConfigError(f"the teacher takes {oracle.input_shape} images but {cfg.data.name} has {test.shape}")
    if isinstance(oracle, HttpOracle):
        log.info(f"teacher: measuring its test accuracy costs {len(test):,} queries to {oracle.url} "
                 "(outside query_budget)")
    return oracle_accuracy(oracle, test.x, test.y)


def _robustness_rows(cfg, oracle, x, idx, pool, run, teacher_sha, data_key, data_name, progress):
    needed = {parse_student_method(s, cfg)[0] for s in cfg.student.methods}
    return {m: robustness_stage(oracle, robustness_settings(cfg, m), x, idx, pool, run, teacher_sha, data_key,
                                data_name, progress, cfg.device)
            for m in cfg.robustness.methods if m in needed}


def _robustness_summary(results: dict[str, tuple[RobustnessResult, Path, bool]]) -> dict[str, Any]:
    keys = ("total_queries", "wall_time_s", "queries_per_s", "chunks_reused", "queries_reused_from_chunks")
    return {m: {**{k: r.provenance.get(k) for k in keys}, "reused": reused} for m, (r, _, reused) in results.items()}


def stage_summary(report: dict[str, Any]) -> dict[str, Any]:
    """What each stage of ``report`` cost when it was made, and which ones this invocation
    reused from an earlier one: a rerun's wall time alone would not say what the whole run took.
    ``time_s`` sums the stages' own times (teacher training, synthesis, soft labels, each
    student's training), not the loading and evaluation around them."""
    stages = []
    t = report["teacher"]
    if "train_time_s" in t:
        stages.append(("teacher", t["train_time_s"], bool(t.get("reused"))))
    if report.get("synthesis"):
        syn = report["synthesis"]
        stages.append(("synthesis", syn.get("wall_time_s") or 0.0, bool(syn.get("reused"))))
    for m, r in (report.get("robustness") or {}).items():
        stages.append((f"soft labels ({m})", r.get("wall_time_s") or 0.0, bool(r.get("reused"))))
    for r in report["students"]:
        stages.append((f"student {r['method']}", r.get("train_time_s") or 0.0, bool(r.get("reused"))))
    return {"time_s": round(sum(s for _, s, _ in stages), 1),
            "made": [n for n, _, reused in stages if not reused],
            "reused": [n for n, _, reused in stages if reused]}


def _run_db3kd(cfg: RunConfig, run: Path, teacher: str, teacher_sha: str, teacher_metrics, progress):
    device = cfg.device
    splits = cfg.data.splits(cfg.seed)
    num_classes = len(splits.train.classes)
    teacher_metrics["test_acc"] = _teacher_test_acc(cfg, teacher, splits.test, teacher_metrics)
    log.info(f"teacher test accuracy {teacher_metrics['test_acc']:.2f}%")
    oracle = _open(cfg, teacher, cfg.query_budget)
    sub_idx = choose_subset(len(splits.train), cfg.data.subset, cfg.seed)
    sub = splits.train.subset(sub_idx)
    pool = CandidatePool(splits.train.x.to(device), splits.train.y.to(device))
    results = _robustness_rows(cfg, oracle, sub.x, sub_idx, pool, run, teacher_sha, splits.fingerprint, sub.name,
                               progress)
    val, test = (splits.val.x, splits.val.y), (splits.test.x, splits.test.y)
    rows = []
    for spec in cfg.student.methods:
        method, budget = parse_student_method(spec, cfg)
        key_parts = [teacher_sha, splits.fingerprint, sub_idx.tolist()]
        if method in BUDGETED["db3kd"]:
            images = splits.train if method == "budgeted-pool" else None
            rows.append({"method": spec, **budgeted_row(method, budget, oracle, cfg.student.arch, cfg.budget, cfg.seed,
                                                        run, teacher_sha, splits.test, images, device,
                                                        [splits.fingerprint])})
            continue
        if method == "ce":
            row = {"method": spec, "label": "hard labels (teacher)", "queries_per_pair": 0, "total_queries": len(sub)}
            make = lambda: (sub.x, label_sharded(oracle, sub.x.to(device)).cpu(), None)  # noqa: E731
        elif method == "whitebox-kd":
            row = {"method": spec, "label": "white-box KD (a reference: needs the teacher's logits)",
                   "queries_per_pair": None, "total_queries": None, "temperature": cfg.student.temperature,
                   "kl_weight": cfg.student.kl_weight, "kl_reduction": cfg.student.kl_reduction}
            make = lambda: (sub.x, sub.y, teacher_logits(cfg.teacher.spec(teacher), sub.x, device))  # noqa: E731
        else:
            res, rpath, _ = results[method]
            extra, tl = soft_row(method, budget, res)
            row = {"method": spec, "label": f"DB3KD-{method.split(':')[0].upper()}", **extra}
            key_parts.append(rpath.name)
            make = lambda tl=tl: (sub.x, sub.y, tl)  # noqa: E731
        row.update(student_row(spec, cfg.student.arch, run, _training(cfg.student), cfg.seed, key_parts, make, val,
                               test, num_classes, device, progress))
        rows.append(row)
    report = {"name": cfg.name, "mode": "db3kd",
              "teacher": {**teacher_metrics, "sha256": teacher_sha, "path": str(teacher)},
              "data": {"name": cfg.data.name, "subset": len(sub), "val": len(splits.val), "test": len(splits.test)},
              "robustness": _robustness_summary(results), "students": rows}
    return report, {}


def _run_zero_shot(cfg: RunConfig, run: Path, teacher: str, teacher_sha: str, teacher_metrics, progress):
    """ZSDB3KD: nothing after the teacher stage sees real training data (only the test set,
    once per student, for the final accuracy)."""
    from ..synthesis import PseudoSamples, label_random_images, synthesize_to_file

    device = cfg.device
    test = cfg.data.load("test")
    num_classes = len(test.classes)
    teacher_metrics["test_acc"] = _teacher_test_acc(cfg, teacher, test, teacher_metrics)
    log.info(f"teacher test accuracy {teacher_metrics['test_acc']:.2f}%")
    oracle = _open(cfg, teacher, cfg.query_budget)
    if not needs_pseudo_samples(cfg):  # budgeted rows only: no pseudo samples to synthesise
        rows = [{"method": spec, **budgeted_row(*parse_student_method(spec, cfg), oracle, cfg.student.arch, cfg.budget,
                                                cfg.seed, run, teacher_sha, test, None, device, [])}
                for spec in cfg.student.methods]
        return {"name": cfg.name, "mode": "zero-shot", "students": rows,
                "teacher": {**teacher_metrics, "sha256": teacher_sha, "path": str(teacher)},
                "data": {"name": cfg.data.name, "subset": 0, "val": 0, "test": len(test),
                         "note": "budgeted students only; no real training image or label is used"}}, {}
    ss = synthesis_settings(cfg)
    pkey = content_key("synthesis", teacher_sha, ss.key(), length=12)
    ppath = run / f"pseudo-{pkey}.safetensors"
    if ppath.exists():
        log.info(f"synthesis: reusing {ppath.name}")
        pseudo = PseudoSamples.load(ppath)
        syn_reused = True
    else:
        log.info(f"synthesis: {ss.per_class} x {num_classes} pseudo samples, {ss.iterations} rounds")
        pseudo = synthesize_to_file(ppath, oracle, ss, device=device, progress=progress)
        syn_reused = False
    q_syn = int(pseudo.provenance["total_queries"])
    log.info(f"synthesis: {q_syn:,} queries; mean boundary distance {pseudo.mean_distance[0]:.3f} -> "
             f"{pseudo.mean_distance[-1]:.3f}")
    tr_idx, va_idx = train_val_split(pseudo.y, cfg.student.val_fraction, cfg.seed)  # held out for selection
    px, py = pseudo.x[tr_idx], pseudo.y[tr_idx]
    val, tst = (pseudo.x[va_idx], pseudo.y[va_idx]), (test.x, test.y)
    pool = CandidatePool(px.to(device), py.to(device))  # initial directions: pseudo samples of the target class
    results = _robustness_rows(cfg, oracle, px, tr_idx, pool, run, teacher_sha, pkey, f"pseudo-{pkey}", progress)
    specs = [parse_student_method(s, cfg) + (s,) for s in cfg.student.methods]
    st = cfg.student
    max_total = q_syn
    for method, budget, _ in specs:
        if method == "random-ce":
            max_total = max(max_total, st.random_samples)
        elif method in BUDGETED["db3kd"]:
            max_total = max(max_total, budget)
        elif method not in ("noise-ce", "zs-ce"):
            max_total = max(max_total, soft_row(method, budget, results[method][0], q_syn)[0]["total_queries"])
    rows = []
    for method, budget, spec in specs:
        key_parts, epochs = [teacher_sha, pkey], None
        if method in BUDGETED["zero-shot"]:
            rows.append({"method": spec, **budgeted_row(method, budget, oracle, st.arch, cfg.budget, cfg.seed, run,
                                                        teacher_sha, test, None, device, [])})
            continue
        if method == "zs-ce":
            row = {"method": spec, "label": "pseudo samples, hard labels", "queries_per_pair": 0,
                   "total_queries": q_syn}
            make = lambda: (px, py, None)  # noqa: E731
        elif method == "noise-ce":
            n = st.noise_samples or min(max_total, st.noise_cap)
            epochs = max(1, round(st.epochs * len(px) / n))  # the same number of steps as the pseudo-sample students
            row = {"method": spec, "label": f"uniform noise, hard labels ({n:,} samples, {epochs} epochs)",
                   "queries_per_pair": 0, "total_queries": n}
            key_parts.append(n)

            def make(n=n):
                xs = torch.rand(n, *oracle.input_shape, generator=generator(cfg.seed, "noise-ce"))
                return xs, label_sharded(oracle, xs.to(device)).cpu(), None
        elif method == "random-ce":
            n_train, epochs = st.random_samples - st.random_val, st.random_epochs
            row = {"method": spec, "label": f"random {st.random_kind} images, hard labels ({n_train:,} samples, "
                                            f"{epochs} epochs; selection on {st.random_val:,} more)",
                   "queries_per_pair": 0, "total_queries": st.random_samples}
            key_parts = [teacher_sha, st.random_kind, st.random_samples, st.random_val]

            def make(n_train=n_train):
                labels = run / f"random-{st.random_kind}-{teacher_sha[:12]}-s{cfg.seed}.labels"  # kept: they cost
                xs, ys = label_random_images(oracle, st.random_kind, st.random_samples, cfg.seed, device=device,
                                             work_dir=labels, progress=progress)
                return xs[:n_train], ys[:n_train], None, (xs[n_train:], ys[n_train:])
        else:
            res, rpath, _ = results[method]
            extra, tl = soft_row(method, budget, res, q_syn)
            row = {"method": spec, "label": f"ZSDB3KD-{method.split(':')[0].upper()}", **extra}
            key_parts.append(rpath.name)
            make = lambda tl=tl: (px, py, tl)  # noqa: E731
        row.update(student_row(spec, st.arch, run, _training(st), cfg.seed, key_parts, make, val, tst, num_classes,
                               device, progress, epochs))
        rows.append(row)
    report = {"name": cfg.name, "mode": "zero-shot",
              "teacher": {**teacher_metrics, "sha256": teacher_sha, "path": str(teacher)},
              "data": {"name": cfg.data.name, "subset": len(px), "val": len(va_idx), "test": len(test),
                       "note": "subset/val are pseudo samples; no real training image or label is used"},
              "synthesis": {**pseudo.provenance, "mean_distance": pseudo.mean_distance.tolist(), "reused": syn_reused},
              "robustness": _robustness_summary(results), "students": rows}
    return report, {"pseudo": pseudo, "classes": test.classes}
