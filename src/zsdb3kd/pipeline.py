"""Whole experiments and the library calls behind each CLI command.

One declarative TOML file describes a run (data, teacher, robustness, students);
:func:`run_experiment` executes its stages in order::

    teacher -> [synthesis] -> soft labels (robustness) -> students -> report

Every stage's artifact is named by a content hash of everything that determines it
(data fingerprint, teacher file hash, settings, seed), so a rerun reuses finished
stages, and the robustness stage resumes from its last finished chunk after an
interruption. The resolved configuration is written into the run directory; a
directory that holds a *different* configuration is refused rather than overwritten.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch

from .data import ImageSet, dataset_fingerprint, load_dataset, train_val_split
from .distill import TrainConfig, accuracy, predict, train
from .models import create_model
from .oracle import LabelOracle, load_oracle
from .robustness import CandidatePool, RobustnessResult, RobustnessSettings, compute_robustness
from .robustness.engine import PAPER_CHECKPOINTS, PRESETS
from .softlabels import logits_from_distances
from .weights import file_sha256, load_weights, save_weights


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message says which key and why."""


@dataclass
class DataConfig:
    name: str = "fashion-mnist"
    root: str | None = None
    val_size: int = 5000
    subset: int = 2000  # training images that get soft labels and train the students


@dataclass
class TeacherConfig:
    arch: str = "lenet5"
    path: str | None = None  # an existing teacher (weights or .onnx) instead of training one
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 256


@dataclass
class RobustnessConfig:
    methods: list[str] = field(default_factory=lambda: ["sd", "bd", "mbd"])
    budget: int = 2000
    checkpoints: list[int] = field(default_factory=lambda: [250, 500, 1000, 2000])
    chunk_size: int = 256
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method estimator arguments


@dataclass
class StudentConfig:
    arch: str = "lenet5-half"
    methods: list[str] = field(default_factory=lambda: ["ce", "whitebox-kd", "sd", "bd", "mbd@1000", "mbd@2000"])
    epochs: int = 200
    lr: float = 1e-3
    batch_size: int = 512
    temperature: float = 20.0
    kl_weight: float = 1.0
    kl_reduction: str = "sum"


@dataclass
class RunConfig:
    name: str = "experiment"
    seed: int = 0
    device: str = "cpu"
    query_budget: int | None = None  # total teacher queries allowed for the whole run
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    student: StudentConfig = field(default_factory=StudentConfig)


def _build(cls, raw: dict[str, Any], where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in [{where}]; allowed: {sorted(known)}")
    kwargs = {}
    for name, value in raw.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not field().default_factory else f.default  # type: ignore[misc]
        if is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}.{name}" if where else name)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a run configuration (TOML; nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    cfg = _build(RunConfig, raw, "")
    validate_config(cfg)
    return cfg


def validate_config(cfg: RunConfig) -> None:
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    if cfg.data.subset < 1 or cfg.data.val_size < 1:
        raise ConfigError("data.subset and data.val_size must be >= 1")
    for m in cfg.robustness.methods:
        if m not in PRESETS:
            raise ConfigError(f"robustness.methods: unknown method {m!r}; known: {sorted(PRESETS)}")
    for spec in cfg.student.methods:
        parse_student_method(spec, cfg.robustness)


def parse_student_method(spec: str, rob: RobustnessConfig) -> tuple[str, int | None]:
    """``"ce"``, ``"whitebox-kd"`` or ``"<robustness method>[@<queries per pair>]"``."""
    if spec in ("ce", "whitebox-kd"):
        return spec, None
    method, _, b = spec.partition("@")
    if method not in rob.methods:
        raise ConfigError(f"student method {spec!r}: {method!r} is not among robustness.methods {rob.methods}")
    budget = rob.budget
    if b:
        try:
            budget = int(b)
        except ValueError:
            raise ConfigError(f"student method {spec!r}: budget after '@' must be an integer") from None
        if budget > rob.budget:
            raise ConfigError(f"student method {spec!r}: {budget} exceeds robustness.budget {rob.budget}")
    return method, budget


def _key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def log(msg: str) -> None:
    print(f"[zsdb3kd] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------


@dataclass
class Splits:
    """The training data carved into train/val, plus the test set."""

    train: ImageSet
    val: ImageSet
    test: ImageSet
    fingerprint: str


def load_splits(name: str, root: str | None, val_size: int, seed: int) -> Splits:
    full = load_dataset(name, root, "train")
    test = load_dataset(name, root, "test")
    tr, va = train_val_split(full.y, val_size, seed)
    fp = _key(dataset_fingerprint(full), dataset_fingerprint(test), val_size, seed)
    return Splits(full.subset(tr), full.subset(va), test, fp)


def choose_subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of ``n`` of ``n_total`` items, deterministic under ``seed``."""
    if n < 1:
        raise ConfigError(f"subset must be >= 1, got {n}")
    if n > n_total:
        raise ConfigError(f"subset of {n} requested but only {n_total} training images remain after the split")
    g = torch.Generator().manual_seed(seed + 7919)
    return torch.randperm(n_total, generator=g)[:n].sort().values


# ---------------------------------------------------------------------------------------
# stages (each is also what one CLI command calls)
# ---------------------------------------------------------------------------------------


def train_teacher(splits: Splits, arch: str, out: str | os.PathLike, config: TrainConfig, *, device: str = "cpu",
                  progress: bool | None = None) -> dict[str, Any]:
    """Cross-entropy training of a registry model; selects on val, reports test accuracy once."""
    model = create_model(arch, num_classes=len(splits.train.classes), input_shape=splits.train.shape)
    res = train(model, splits.train.x, splits.train.y, splits.val.x, splits.val.y, config, device=device,
                desc=f"teacher[{arch}]", progress=progress)
    test_acc = accuracy(model, splits.test.x, splits.test.y, device=device)
    metrics = {"arch": arch, "val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch,
               "train_time_s": round(res.wall_time_s, 2), "train_config": asdict(config), "data": splits.train.name}
    save_weights(model, out, arch=arch, input_shape=splits.train.shape, num_classes=len(splits.train.classes),
                 extra={"test_acc": f"{test_acc:.4f}", "data": splits.train.name})
    return metrics


def distill_student(
    arch: str,
    x: torch.Tensor,
    y: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    out: str | os.PathLike,
    *,
    teacher_logits: torch.Tensor | None = None,
    num_classes: int = 10,
    device: str = "cpu",
    desc: str = "student",
    progress: bool | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Train a student (CE or KD), select on ``val``, evaluate once on ``test``, save it."""
    model = create_model(arch, num_classes=num_classes, input_shape=tuple(x.shape[1:]))
    res = train(model, x, y, val[0], val[1], config, teacher_logits=teacher_logits, device=device, desc=desc,
                progress=progress)
    test_acc = accuracy(model, test[0], test[1], device=device)
    save_weights(model, out, arch=arch, input_shape=tuple(x.shape[1:]), num_classes=num_classes,
                 extra={"test_acc": f"{test_acc:.4f}", **(extra or {})})
    return {"val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch,
            "train_time_s": round(res.wall_time_s, 2)}


def teacher_logits_whitebox(teacher_path: str | os.PathLike, x: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """The teacher's real logits: needs white-box access (an upper-bound baseline only)."""
    path = Path(teacher_path)
    if path.suffix.lower() == ".onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return torch.cat([torch.from_numpy(sess.run(None, {name: x[i:i + 2048].numpy()})[0])
                          for i in range(0, len(x), 2048)])
    model, _ = load_weights(path, device=device)
    return predict(model, x, device=device)


def queries_at(result: RobustnessResult, budget: int) -> int:
    """Teacher queries a run would have made with a per-pair budget of ``budget``."""
    return int(result.queries.clamp(max=budget).sum()) + len(result.indices)


# ---------------------------------------------------------------------------------------
# the whole experiment
# ---------------------------------------------------------------------------------------


def run_experiment(config: RunConfig | str | os.PathLike, run_dir: str | os.PathLike | None = None, *,
                   progress: bool | None = None, force: bool = False) -> dict[str, Any]:
    """Run (or resume) a DB3KD experiment; returns the report rows and writes the report."""
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    validate_config(cfg)
    run = Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    run.mkdir(parents=True, exist_ok=True)
    resolved = asdict(cfg)
    stamp = run / "config.resolved.json"
    if stamp.exists() and not force:
        old = json.loads(stamp.read_text())
        if old != json.loads(json.dumps(resolved, default=str)):
            raise ConfigError(
                f"{run} holds a run with a different configuration ({stamp}); choose another run directory "
                "or pass --force to replace its report (finished stages are still reused by content)"
            )
    _write_json(stamp, resolved)
    device = cfg.device
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()

    # -- data ---------------------------------------------------------------------------
    log(f"loading {cfg.data.name}")
    splits = load_splits(cfg.data.name, cfg.data.root, cfg.data.val_size, cfg.seed)
    num_classes = len(splits.train.classes)

    # -- teacher ------------------------------------------------------------------------
    tcfg = TrainConfig(epochs=cfg.teacher.epochs, lr=cfg.teacher.lr, batch_size=cfg.teacher.batch_size, seed=cfg.seed)
    if cfg.teacher.path:
        teacher_path = Path(cfg.teacher.path)
        if not teacher_path.is_file():
            raise ConfigError(f"teacher.path {teacher_path} does not exist")
        teacher_metrics = {"path": str(teacher_path)}
    else:
        tkey = _key("teacher", splits.fingerprint, cfg.teacher.arch, asdict(tcfg))
        teacher_path = run / f"teacher-{cfg.teacher.arch}-{tkey}.safetensors"
        tmetrics_path = teacher_path.with_suffix(".json")
        if teacher_path.exists() and tmetrics_path.exists():
            log(f"teacher: reusing {teacher_path.name}")
            teacher_metrics = json.loads(tmetrics_path.read_text())
        else:
            log(f"teacher: training {cfg.teacher.arch} for {cfg.teacher.epochs} epochs")
            teacher_metrics = train_teacher(splits, cfg.teacher.arch, teacher_path, tcfg, device=device,
                                            progress=progress)
            _write_json(tmetrics_path, teacher_metrics)
    teacher_sha = file_sha256(teacher_path)
    oracle = load_oracle(teacher_path, device=device, budget=cfg.query_budget)
    if "test_acc" not in teacher_metrics or cfg.teacher.path:
        teacher_metrics["test_acc"] = _oracle_accuracy(oracle, splits.test)
        oracle._queries = 0  # evaluating the teacher is not part of the distillation budget  # noqa: SLF001
    log(f"teacher test accuracy {teacher_metrics['test_acc']:.2f}%")

    # -- distillation subset and candidate pool -----------------------------------------
    sub_idx = choose_subset(len(splits.train), cfg.data.subset, cfg.seed)
    sub = splits.train.subset(sub_idx)
    pool = CandidatePool(splits.train.x.to(device), splits.train.y.to(device))

    # -- soft labels (robustness) -------------------------------------------------------
    results: dict[str, tuple[RobustnessResult, Path]] = {}
    needed = {parse_student_method(s, cfg.robustness)[0] for s in cfg.student.methods} - {"ce", "whitebox-kd"}
    for method in cfg.robustness.methods:
        if method not in needed:
            continue
        settings = RobustnessSettings(
            method=method, budget=cfg.robustness.budget, checkpoints=tuple(cfg.robustness.checkpoints),
            seed=cfg.seed, chunk_size=cfg.robustness.chunk_size, options=cfg.robustness.options.get(method, {}))
        rkey = _key("robustness", teacher_sha, splits.fingerprint, sub_idx.tolist(), settings.key())
        out = run / f"robustness-{method}-{rkey}.safetensors"
        if out.exists():
            log(f"robustness[{method}]: reusing {out.name}")
            res = RobustnessResult.load(out)
        else:
            log(f"robustness[{method}]: {len(sub)} samples x {num_classes - 1} targets, "
                f"budget {settings.budget} queries per pair")
            res = compute_robustness(
                oracle, sub.x.to(device), settings, pool=pool, indices=sub_idx,
                work_dir=out.with_name(out.name + ".parts"), progress=progress,
                provenance={"teacher": str(teacher_path), "teacher_sha256": teacher_sha, "data": sub.name,
                            "data_fingerprint": splits.fingerprint})
            res.save(out)
            from .robustness.engine import cleanup_parts

            cleanup_parts(out.with_name(out.name + ".parts"))
        results[method] = (res, out)

    # -- students -----------------------------------------------------------------------
    scfg = TrainConfig(epochs=cfg.student.epochs, lr=cfg.student.lr, batch_size=cfg.student.batch_size,
                       temperature=cfg.student.temperature, kl_weight=cfg.student.kl_weight,
                       kl_reduction=cfg.student.kl_reduction, seed=cfg.seed)
    rows = []
    for spec in cfg.student.methods:
        method, budget = parse_student_method(spec, cfg.robustness)
        skey = _key("student", spec, cfg.student.arch, asdict(scfg), teacher_sha, splits.fingerprint,
                    sub_idx.tolist(), str(results[method][1].name) if method in results else None)
        out = run / f"student-{spec.replace('@', '-')}-{skey}.safetensors"
        mpath = out.with_suffix(".json")
        row: dict[str, Any] = {"method": spec}
        if method == "ce":
            labels = oracle(sub.x.to(device)).cpu() if not mpath.exists() else None
            row.update(queries_per_pair=0, total_queries=len(sub), label="hard labels (teacher)")
            y, tl = labels, None
        elif method == "whitebox-kd":
            row.update(queries_per_pair=None, total_queries=None, label="white-box KD (upper bound, needs logits)")
            y, tl = sub.y, (teacher_logits_whitebox(teacher_path, sub.x, device) if not mpath.exists() else None)
        else:
            res, _ = results[method]
            d = res.at(budget)
            tl = logits_from_distances(d, res.teacher_labels)
            y = sub.y
            mean_q = float(res.queries.clamp(max=budget).sum() / max(1, (res.queries > 0).sum()))
            frac = queries_at(res, budget) / max(1, res.total_queries)
            failed = int((~torch.isfinite(d) & ~torch.isnan(d)).sum())
            row.update(queries_per_pair=budget if method != "sd" else 0, mean_queries_per_pair=round(mean_q, 1),
                       total_queries=queries_at(res, budget) if method != "sd" else len(sub),
                       soft_label_time_s=round(res.provenance.get("wall_time_s", 0.0) * frac, 1),
                       failed_pairs=failed, label=f"DB3KD-{method.upper()}")
        if mpath.exists():
            log(f"student[{spec}]: reusing {out.name}")
            metrics = json.loads(mpath.read_text())
        else:
            log(f"student[{spec}]: training {cfg.student.arch} for {cfg.student.epochs} epochs")
            metrics = distill_student(cfg.student.arch, sub.x, y, (splits.val.x, splits.val.y),
                                      (splits.test.x, splits.test.y), scfg, out, teacher_logits=tl,
                                      num_classes=num_classes, device=device, desc=f"student[{spec}]",
                                      progress=progress, extra={"method": spec})
            _write_json(mpath, metrics)
        row.update(metrics)
        rows.append(row)
        log(f"student[{spec}]: val {metrics['val_acc']:.2f}%  test {metrics['test_acc']:.2f}%")

    report = {
        "name": cfg.name,
        "teacher": {**teacher_metrics, "sha256": teacher_sha, "path": str(teacher_path)},
        "data": {"name": cfg.data.name, "subset": len(sub), "val": len(splits.val), "test": len(splits.test)},
        "robustness": {m: {k: r.provenance.get(k) for k in ("total_queries", "wall_time_s", "queries_per_s")}
                       for m, (r, _) in results.items()},
        "students": rows,
        "wall_time_s": round(time.perf_counter() - t_start, 1),
    }
    write_report(run, report, results)
    return report


def _oracle_accuracy(oracle: LabelOracle, test: ImageSet) -> float:
    labels = oracle(test.x.to(oracle.device))
    return float((labels.cpu() == test.y).float().mean() * 100)


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_report(run: Path, report: dict[str, Any], results: dict[str, tuple[RobustnessResult, Path]]) -> Path:
    """``report.md`` (a table), ``report.json`` and ``accuracy_vs_queries.png`` in ``run``."""
    t = report["teacher"]
    lines = [
        f"# {report['name']}",
        "",
        f"Teacher `{t.get('arch', t.get('path'))}`: test accuracy {_fmt(t.get('test_acc'))}% "
        f"(sha256 `{t['sha256'][:12]}`). Distillation subset: {report['data']['subset']:,} training images of "
        f"{report['data']['name']}; selection on {report['data']['val']:,} held-out training images; "
        f"test on {report['data']['test']:,}.",
        "",
        "| student | queries per pair | total teacher queries | soft-label time (s) | train time (s) | val acc (%) | test acc (%) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["students"]:
        lines.append(
            f"| {r['method']} ({r.get('label', '')}) | {_fmt(r.get('queries_per_pair'))} | {_fmt(r.get('total_queries'))} | "
            f"{_fmt(r.get('soft_label_time_s'), 1)} | {_fmt(r.get('train_time_s'), 1)} | {_fmt(r.get('val_acc'))} | "
            f"{_fmt(r.get('test_acc'))} |")
    lines += ["", "Engine throughput (teacher queries per second, whole soft-label stage):", ""]
    for m, info in report["robustness"].items():
        lines.append(f"- {m}: {_fmt(info.get('total_queries'))} queries, {_fmt(info.get('wall_time_s'), 1)} s, "
                     f"{_fmt(info.get('queries_per_s'), 0)} q/s")
    lines += ["", f"Total wall time of this invocation: {report['wall_time_s']} s.", "",
              "![accuracy vs queries](accuracy_vs_queries.png)", ""]
    md = run / "report.md"
    md.write_text("\n".join(lines))
    _write_json(run / "report.json", report)
    _plot(run / "accuracy_vs_queries.png", report)
    log(f"report: {md}")
    return md


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in report["students"]:
        name, _, _ = r["method"].partition("@")
        if name in ("ce", "whitebox-kd", "sd"):
            style = {"ce": ("k", ":"), "whitebox-kd": ("tab:green", "--"), "sd": ("tab:gray", "-.")}[name]
            ax.axhline(r["test_acc"], color=style[0], ls=style[1], label=f"{r['method']} ({r['test_acc']:.2f}%)")
        else:
            curves.setdefault(name, []).append((r["queries_per_pair"], r["test_acc"]))
    for name, pts in curves.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"DB3KD-{name.upper()}")
    ax.set_xlabel("teacher queries per (sample, target) pair")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(report["name"])
    if curves:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
