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

from .artifacts import environment
from .data import ImageSet, dataset_fingerprint, load_dataset, train_val_split
from .distill import TrainConfig, accuracy, predict, train
from .models import create_model
from .oracle import HttpOracle, LabelOracle, is_url, load_oracle, teacher_sha256
from .robustness import CandidatePool, RobustnessResult, RobustnessSettings
from .robustness.engine import PAPER_CHECKPOINTS, PRESETS, compute_to_file
from .softlabels import logits_from_distances
from .weights import load_weights, save_weights


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
    path: str | None = None  # an existing teacher (weights, .onnx or a label server URL) instead of training one
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 256
    augment: str = "none"  # or "flip-crop" (random mirror and 4-pixel shift; the usual CIFAR recipe)


@dataclass
class RobustnessConfig:
    methods: list[str] = field(default_factory=lambda: ["sd", "bd", "mbd"])
    budget: int = 2000
    checkpoints: list[int] = field(default_factory=lambda: [250, 500, 1000, 2000])
    chunk_size: int = 256
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-method estimator arguments
    allocation: str = "uniform"  # or "nearest": rank targets cheaply, refine the nearest (mbd/hsja only)
    rank_fraction: float = 0.25
    top_k: int = 3


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
    augment: str = "none"  # or "flip-crop"; the soft label of an image is kept for its augmented copies
    val_fraction: float = 0.1  # zero-shot: share of pseudo samples held out for selection
    noise_samples: int | None = None  # zero-shot noise baseline size (default: the zero-shot query total)
    noise_cap: int = 100_000  # noise-ce trains for epochs * n_pseudo / n_noise epochs: the same number of steps
    # random-ce (zero-shot, beyond the paper): random images labelled by the teacher, one query each
    random_kind: str = "smooth"  # "smooth" (low-frequency blobs), "paper", "mixed" or "uniform"
    random_samples: int = 1_000_000  # including the held-out slice
    random_val: int = 10_000  # held out (teacher-labelled random images) for model selection
    random_epochs: int = 5


@dataclass
class SynthesisConfig:
    """Zero-shot pseudo samples (see :class:`zsdb3kd.synthesis.SynthesisSettings`)."""

    per_class: int = 200
    iterations: int = 10
    snapshots: list[int] = field(default_factory=lambda: [0, 2, 5, 10])
    step: float = 0.5
    search_budget: int = 300
    search_dirs: int = 4
    search_k: int = 40
    noise: str = "mixed"
    noise_budget: int = 2_000_000
    noise_batch: int = 2000


@dataclass
class RunConfig:
    name: str = "experiment"
    mode: str = "db3kd"  # or "zero-shot"
    seed: int = 0
    device: str = "cpu"
    query_budget: int | None = None  # total teacher queries allowed for the whole run
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)


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
            _check_type(value, f.type, f"[{where or 'top level'}] {name}")
            kwargs[name] = value
    return cls(**kwargs)


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def _check_type(value: Any, annotation: Any, where: str) -> None:
    """Check a TOML value against a field annotation such as ``int``, ``int | None``, ``list[int]``."""
    ann = str(annotation).replace(" ", "")
    if value is None or ann.startswith("dict["):
        return
    options = ann.split("|")
    for opt in options:
        if opt == "None":
            continue
        if opt.startswith("list["):
            inner = _TYPES.get(opt[5:-1])
            if isinstance(value, list) and (inner is None or all(isinstance(v, inner) and not
                                                                   (isinstance(v, bool) and bool not in inner)
                                                                   for v in value)):
                return
        elif opt in _TYPES:
            ok = _TYPES[opt]
            if isinstance(value, ok) and not (isinstance(value, bool) and bool not in ok):
                return
        else:
            return  # an annotation we do not check
    raise ConfigError(f"{where} must be {ann.replace('|', ' or ')}, got {type(value).__name__} {value!r}")


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
    if cfg.mode not in ("db3kd", "zero-shot"):
        raise ConfigError(f"mode must be 'db3kd' or 'zero-shot', got {cfg.mode!r}")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    if cfg.data.subset < 1 or cfg.data.val_size < 1:
        raise ConfigError("data.subset and data.val_size must be >= 1")
    for m in cfg.robustness.methods:
        if m not in PRESETS:
            raise ConfigError(f"robustness.methods: unknown method {m!r}; known: {sorted(PRESETS)}")
    for spec in cfg.student.methods:
        parse_student_method(spec, cfg)
    if cfg.teacher.path and is_url(cfg.teacher.path) and "whitebox-kd" in cfg.student.methods:
        raise ConfigError("student method whitebox-kd reads the teacher's logits: it needs teacher.path to be "
                          "a weights file, not a URL")
    checks = [("[teacher]", lambda: _teacher_config(cfg)),
              ("[student]", lambda: _student_config(cfg))]
    for m in cfg.robustness.methods:
        checks.append((f"[robustness] ({m})", lambda m=m: _robustness_settings(cfg, m)))
    if cfg.mode == "zero-shot":
        checks.append(("[synthesis]", lambda: _synthesis_settings(cfg)))
        if not 0 < cfg.student.val_fraction < 1:
            raise ConfigError(f"[student] val_fraction must be in (0, 1), got {cfg.student.val_fraction}")
        st = cfg.student
        if "random-ce" in st.methods:
            from .synthesis import NOISE_KINDS

            if st.random_kind not in NOISE_KINDS + ("uniform",):
                raise ConfigError(f"[student] random_kind must be one of {NOISE_KINDS + ('uniform',)}, "
                                  f"got {st.random_kind!r}")
            if not 1 <= st.random_val < st.random_samples or st.random_epochs < 1:
                raise ConfigError("[student] random-ce needs 1 <= random_val < random_samples and random_epochs >= 1")
            if cfg.query_budget is not None and st.random_samples > cfg.query_budget:
                raise ConfigError(f"[student] random_samples ({st.random_samples:,}) exceeds query_budget "
                                  f"({cfg.query_budget:,}): each random image costs one query")
    for where, build in checks:
        try:
            build()
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


def parse_student_method(spec: str, cfg: RunConfig) -> tuple[str, int | None]:
    """Baselines (db3kd: ``ce``, ``whitebox-kd``; zero-shot: ``noise-ce``, ``zs-ce``, ``random-ce``) or
    ``"<robustness method>[@<queries per pair>]"``."""
    rob = cfg.robustness
    baselines = ("ce", "whitebox-kd") if cfg.mode == "db3kd" else ("noise-ce", "zs-ce", "random-ce")
    if spec in baselines:
        return spec, None
    if spec in ("ce", "whitebox-kd", "noise-ce", "zs-ce", "random-ce"):
        raise ConfigError(f"student method {spec!r} is not available in mode {cfg.mode!r}; baselines: {baselines}")
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
        if budget != rob.budget and budget not in rob.checkpoints and method != "sd":
            raise ConfigError(f"student method {spec!r}: {budget} is not a recorded budget; "
                              f"add it to robustness.checkpoints {rob.checkpoints}")
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


def training_checkpoint(out: str | os.PathLike) -> Path:
    """Where the training of the model to be saved at ``out`` keeps its state until it ends:
    an interrupted run resumes from its last finished epoch."""
    out = Path(out)
    return out.with_name(out.name + ".train.pt")


def train_teacher(splits: Splits, arch: str, out: str | os.PathLike, config: TrainConfig, *, device: str = "cpu",
                  progress: bool | None = None) -> dict[str, Any]:
    """Cross-entropy training of a registry model; selects on val, reports test accuracy once."""
    torch.manual_seed(config.seed)  # initial weights depend on the seed only, not on earlier stages
    model = create_model(arch, num_classes=len(splits.train.classes), input_shape=splits.train.shape)
    res = train(model, splits.train.x, splits.train.y, splits.val.x, splits.val.y, config, device=device,
                desc=f"teacher[{arch}]", progress=progress, checkpoint=training_checkpoint(out))
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
    torch.manual_seed(config.seed)  # initial weights depend on the seed only, not on earlier students
    model = create_model(arch, num_classes=num_classes, input_shape=tuple(x.shape[1:]))
    res = train(model, x, y, val[0], val[1], config, teacher_logits=teacher_logits, device=device, desc=desc,
                progress=progress, checkpoint=training_checkpoint(out))
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


def _same_config(old: Any, new: Any, defaults: Any) -> bool:
    """Whether a run directory's stored configuration ``old`` is ``new``. A setting missing
    from ``old`` counts as equal when ``new`` has its default value: directories written
    before that setting existed stay usable."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return old == new
    if set(old) - set(new):
        return False
    defaults = defaults if isinstance(defaults, dict) else {}
    for k, v in new.items():
        if k not in old:
            if k not in defaults or v != defaults[k]:
                return False
        elif not _same_config(old[k], v, defaults.get(k)):
            return False
    return True


def _prepare_run(cfg: RunConfig, run_dir, force: bool) -> Path:
    run = Path(run_dir) if run_dir is not None else Path("runs") / cfg.name
    run.mkdir(parents=True, exist_ok=True)
    resolved = json.loads(json.dumps(asdict(cfg), default=str))
    stamp = run / "config.resolved.json"
    if stamp.exists() and not force:
        old = json.loads(stamp.read_text())
        defaults = json.loads(json.dumps(asdict(RunConfig()), default=str))
        if not _same_config(old, resolved, defaults):
            raise ConfigError(
                f"{run} holds a run with a different configuration ({stamp}); choose another run directory "
                "or pass --force to replace its report (finished stages are still reused by content)"
            )
    _write_json(stamp, resolved)
    return run


def _stage_teacher(cfg: RunConfig, run: Path, progress) -> tuple[Path | str, dict[str, Any]]:
    """The teacher file: given (``teacher.path``, a file or the URL of a label server) or
    trained here on the real training data.

    Training the teacher is the model owner's job; it is the only stage that may read the
    training data in a zero-shot run."""
    if cfg.teacher.path and is_url(cfg.teacher.path):
        return cfg.teacher.path, {"path": cfg.teacher.path}
    if cfg.teacher.path:
        path = Path(cfg.teacher.path)
        if not path.is_file():
            raise ConfigError(f"teacher.path {path} does not exist")
        return path, {"path": str(path)}
    tcfg = _teacher_config(cfg)
    splits = load_splits(cfg.data.name, cfg.data.root, cfg.data.val_size, cfg.seed)
    skey = _key("teacher", splits.fingerprint, cfg.teacher.arch, tcfg.key())
    path = run / f"teacher-{cfg.teacher.arch}-{skey}.safetensors"
    mpath = path.with_suffix(".json")
    if path.exists() and mpath.exists():
        log(f"teacher: reusing {path.name}")
        return path, json.loads(mpath.read_text())
    log(f"teacher: training {cfg.teacher.arch} for {cfg.teacher.epochs} epochs")
    metrics = train_teacher(splits, cfg.teacher.arch, path, tcfg, device=cfg.device, progress=progress)
    metrics["environment"] = environment()
    _write_json(mpath, metrics)
    return path, metrics


def _stage_robustness(oracle: LabelOracle, method: str, x: torch.Tensor, indices: torch.Tensor,
                      pool: CandidatePool, cfg: RunConfig, run: Path, teacher_sha: str, data_key: str,
                      data_name: str, progress) -> tuple[RobustnessResult, Path]:
    settings = _robustness_settings(cfg, method)
    rkey = _key("robustness", teacher_sha, data_key, indices.tolist(), settings.key())
    out = run / f"robustness-{method}-{rkey}.safetensors"
    if out.exists():
        log(f"robustness[{method}]: reusing {out.name}")
        return RobustnessResult.load(out), out
    log(f"robustness[{method}]: {len(x)} samples x {oracle.num_classes - 1} targets, "
        f"budget {settings.budget} queries per pair")
    res = compute_to_file(out, oracle, x.to(cfg.device), settings, pool=pool, indices=indices, progress=progress,
                          provenance={"teacher_sha256": teacher_sha, "data": data_name, "data_key": data_key})
    return res, out


def _robustness_settings(cfg: RunConfig, method: str) -> RobustnessSettings:
    r = cfg.robustness
    extra = {} if method in ("sd", "bd") else {"allocation": r.allocation, "rank_fraction": r.rank_fraction,
                                               "top_k": r.top_k}
    return RobustnessSettings(method=method, budget=r.budget, checkpoints=tuple(r.checkpoints), seed=cfg.seed,
                              chunk_size=r.chunk_size, options=r.options.get(method, {}), **extra)


def _synthesis_settings(cfg: RunConfig):
    from .synthesis import SynthesisSettings

    sy = cfg.synthesis
    return SynthesisSettings(per_class=sy.per_class, iterations=sy.iterations, snapshots=tuple(sy.snapshots),
                             step=sy.step, search_budget=sy.search_budget, search_dirs=sy.search_dirs,
                             search_k=sy.search_k, noise=sy.noise, noise_budget=sy.noise_budget,
                             noise_batch=sy.noise_batch, seed=cfg.seed)


def _teacher_config(cfg: RunConfig) -> TrainConfig:
    t = cfg.teacher
    return TrainConfig(epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, augment=t.augment, seed=cfg.seed)


def _student_config(cfg: RunConfig) -> TrainConfig:
    return TrainConfig(epochs=cfg.student.epochs, lr=cfg.student.lr, batch_size=cfg.student.batch_size,
                       temperature=cfg.student.temperature, kl_weight=cfg.student.kl_weight,
                       kl_reduction=cfg.student.kl_reduction, augment=cfg.student.augment, seed=cfg.seed)


def _soft_row(method: str, budget: int, res: RobustnessResult, extra_queries: int = 0) -> tuple[dict, torch.Tensor]:
    d = res.at(budget)
    tl = logits_from_distances(d, res.teacher_labels)
    frac = queries_at(res, budget) / max(1, res.total_queries)
    failed = int((torch.isinf(d)).sum())
    own = torch.isnan(d)
    spent = res.queries.clamp(max=budget)[~own].float()
    row = {"queries_per_pair": budget if method != "sd" else 0,
           "mean_queries_per_pair": round(float(spent.mean()), 1) if spent.numel() else 0.0,
           "total_queries": (queries_at(res, budget) if method != "sd" else len(res.indices)) + extra_queries,
           "soft_label_time_s": round(res.provenance.get("wall_time_s", 0.0) * frac, 1),
           "failed_pairs": failed}
    return row, tl


def _train_row(spec: str, run: Path, cfg: RunConfig, key_parts: list, make_inputs, val, test, num_classes: int,
               progress, epochs: int | None = None) -> dict[str, Any]:
    """Train (or reuse) one student; ``make_inputs()`` -> ``(x, y, teacher_logits[, val])`` is only called
    when needed (a fourth element replaces the validation split)."""
    scfg = _student_config(cfg)
    if epochs is not None:
        from dataclasses import replace

        scfg = replace(scfg, epochs=epochs)
    skey = _key("student", spec, cfg.student.arch, scfg.key(), *key_parts)
    out = run / f"student-{spec.replace('@', '-')}-{skey}.safetensors"
    mpath = out.with_suffix(".json")
    if mpath.exists() and out.exists():
        log(f"student[{spec}]: reusing {out.name}")
        return json.loads(mpath.read_text())
    inputs = make_inputs()
    x, y, tl = inputs[:3]
    if len(inputs) > 3:
        val = inputs[3]
    log(f"student[{spec}]: training {cfg.student.arch} on {len(x)} images for {scfg.epochs} epochs")
    metrics = distill_student(cfg.student.arch, x, y, val, test, scfg, out, teacher_logits=tl,
                              num_classes=num_classes, device=cfg.device, desc=f"student[{spec}]",
                              progress=progress, extra={"method": spec})
    metrics["environment"] = environment()
    _write_json(mpath, metrics)
    log(f"student[{spec}]: val {metrics['val_acc']:.2f}%  test {metrics['test_acc']:.2f}%")
    return metrics


def plan_queries(cfg: RunConfig, num_classes: int, n_test: int) -> list[dict[str, Any]]:
    """The most teacher queries each stage of a fresh run of ``cfg`` can spend.

    Rows ``{"stage", "what", "queries", "in_budget"}``; ``in_budget`` is False for the
    teacher's test accuracy, which is measured outside ``query_budget``. Budgets per pair
    are caps, so a run spends at most this (our estimators usually spend all of it);
    stages already finished in the run directory spend nothing.
    """
    K = num_classes
    rows: list[dict[str, Any]] = []

    def add(stage, what, queries, in_budget=True):
        rows.append({"stage": stage, "what": what, "queries": int(queries), "in_budget": in_budget})

    add("teacher", f"given: {cfg.teacher.path}" if cfg.teacher.path else
        f"train {cfg.teacher.arch} on the real training data ({cfg.teacher.epochs} epochs)", 0)
    add("teacher accuracy", f"{n_test:,} test images (measured outside query_budget)", n_test, in_budget=False)
    needed = {parse_student_method(s, cfg)[0] for s in cfg.student.methods}
    if cfg.mode == "zero-shot":
        ss = _synthesis_settings(cfg)
        n = ss.per_class * K
        rounds = [ss.search_budget * (ss.first_budget_factor if i == 0 else 1) for i in range(ss.iterations)]
        final = ss.search_budget * (1 if ss.iterations > 0 else ss.first_budget_factor)
        push = n * (sum(rounds) + ss.iterations * (ss.max_halvings + 1) + final)
        add("synthesis", f"noise until {ss.per_class} per class (at most {ss.noise_budget:,}), then {ss.iterations} "
                         f"rounds of {n:,} searches", ss.noise_budget + push)
        syn_total = rows[-1]["queries"]
        n_samples = len(train_val_split(torch.arange(K).repeat_interleave(ss.per_class), cfg.student.val_fraction,
                                        cfg.seed)[0])
        where = "pseudo samples"
    else:
        n_samples, where, syn_total = cfg.data.subset, "training images", 0
    robust: dict[str, int] = {}
    for method in cfg.robustness.methods:
        if method not in needed:
            continue
        per_pair = 0 if method == "sd" else cfg.robustness.budget
        robust[method] = n_samples + n_samples * (K - 1) * per_pair
        add(f"robustness[{method}]", f"{n_samples:,} {where} x {K - 1} targets x {per_pair:,} + their labels",
            robust[method])
    for spec in cfg.student.methods:
        method, _ = parse_student_method(spec, cfg)
        if method == "ce":
            add(f"student[{spec}]", f"labels of {n_samples:,} {where}", n_samples)
        elif method == "noise-ce":
            st = cfg.student
            most = max([syn_total, st.random_samples if "random-ce" in needed else 0,
                        *(syn_total + q for q in robust.values())])
            n = st.noise_samples or min(most, st.noise_cap)
            add(f"student[{spec}]", f"labels of up to {n:,} uniform-noise images", n)
        elif method == "random-ce":
            add(f"student[{spec}]", f"labels of {cfg.student.random_samples:,} random images (kept for reruns)",
                cfg.student.random_samples)
    return rows


def _classes_and_test_size(cfg: RunConfig) -> tuple[int, int]:
    test = load_dataset(cfg.data.name, cfg.data.root, "test")
    return len(test.classes), len(test)


def plan_experiment(config: RunConfig | str | os.PathLike) -> tuple[RunConfig, list[dict[str, Any]]]:
    """Validate a config and plan its queries (:func:`plan_queries`) without running anything."""
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    validate_config(cfg)
    return cfg, plan_queries(cfg, *_classes_and_test_size(cfg))


def format_plan(cfg: RunConfig, rows: list[dict[str, Any]]) -> str:
    total = sum(r["queries"] for r in rows if r["in_budget"])
    width = max(len(r["stage"]) for r in rows)
    lines = [f"{r['stage']:<{width}}  {r['queries']:>14,}  {r['what']}" for r in rows]
    budget = "no query_budget set" if cfg.query_budget is None else f"query_budget is {cfg.query_budget:,}"
    lines.append(f"{'total':<{width}}  {total:>14,}  counted against query_budget ({budget}); worst case for a "
                 "fresh run: finished stages in the run directory cost nothing")
    return "\n".join(lines)


def run_experiment(config: RunConfig | str | os.PathLike, run_dir: str | os.PathLike | None = None, *,
                   progress: bool | None = None, force: bool = False) -> dict[str, Any]:
    """Run (or resume) an experiment (``mode`` db3kd or zero-shot); writes and returns the report."""
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    validate_config(cfg)
    run = _prepare_run(cfg, run_dir, force)
    plan = plan_queries(cfg, *_classes_and_test_size(cfg))
    log("teacher queries per stage, at most:\n" + format_plan(cfg, plan))
    worst = sum(r["queries"] for r in plan if r["in_budget"])
    if cfg.query_budget is not None and worst > cfg.query_budget:
        log(f"warning: a fresh run may need {worst:,} queries, more than query_budget ({cfg.query_budget:,}); it "
            "stops with an error when the budget runs out (finished stages and chunks are kept)")
    torch.manual_seed(cfg.seed)
    t_start = time.perf_counter()
    teacher_path, teacher_metrics = _stage_teacher(cfg, run, progress)
    teacher_sha = _teacher_sha256(teacher_path)
    if cfg.mode == "zero-shot":
        report, extras = _run_zero_shot(cfg, run, teacher_path, teacher_sha, teacher_metrics, progress)
    else:
        report, extras = _run_db3kd(cfg, run, teacher_path, teacher_sha, teacher_metrics, progress)
    report["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    report["environment"] = environment()
    write_report(run, report, extras)
    return report


def _teacher_sha256(teacher: Path | str) -> str:
    """What names the teacher in every artifact key: its file's sha256, or for a label
    server the sha256 it reports for its model (else a hash of the URL, with a warning:
    then a changed model behind the same URL would not be noticed)."""
    sha = teacher_sha256(teacher)
    if sha:
        return sha
    log(f"warning: {teacher} reports no model_sha256; artifacts are keyed by the URL alone")
    return hashlib.sha256(f"url:{teacher}".encode()).hexdigest()


def _teacher_test_acc(oracle: LabelOracle, test: ImageSet, metrics: dict[str, Any]) -> float:
    if "test_acc" in metrics:
        return float(metrics["test_acc"])
    # a given teacher: measured once with a separate, uncounted oracle so the run's budget is untouched
    if isinstance(oracle, HttpOracle):
        log(f"teacher: measuring its test accuracy costs {len(test):,} queries to {oracle.url} (outside query_budget)")
    return _oracle_accuracy(oracle, test)


def _run_db3kd(cfg, run, teacher_path, teacher_sha, teacher_metrics, progress):
    device = cfg.device
    log(f"loading {cfg.data.name}")
    splits = load_splits(cfg.data.name, cfg.data.root, cfg.data.val_size, cfg.seed)
    num_classes = len(splits.train.classes)
    teacher_metrics["test_acc"] = _teacher_test_acc(load_oracle(teacher_path, device=device), splits.test,
                                                    teacher_metrics)
    log(f"teacher test accuracy {teacher_metrics['test_acc']:.2f}%")
    oracle = load_oracle(teacher_path, device=device, budget=cfg.query_budget)
    sub_idx = choose_subset(len(splits.train), cfg.data.subset, cfg.seed)
    sub = splits.train.subset(sub_idx)
    pool = CandidatePool(splits.train.x.to(device), splits.train.y.to(device))
    needed = {parse_student_method(s, cfg)[0] for s in cfg.student.methods}
    results: dict[str, tuple[RobustnessResult, Path]] = {}
    for method in cfg.robustness.methods:
        if method in needed:
            results[method] = _stage_robustness(oracle, method, sub.x, sub_idx, pool, cfg, run, teacher_sha,
                                                splits.fingerprint, sub.name, progress)
    val, test = (splits.val.x, splits.val.y), (splits.test.x, splits.test.y)
    rows = []
    for spec in cfg.student.methods:
        method, budget = parse_student_method(spec, cfg)
        key_parts = [teacher_sha, splits.fingerprint, sub_idx.tolist()]
        if method == "ce":
            row = {"method": spec, "label": "hard labels (teacher)", "queries_per_pair": 0,
                   "total_queries": len(sub)}
            make = lambda: (sub.x, oracle(sub.x.to(device)).cpu(), None)  # noqa: E731
        elif method == "whitebox-kd":
            row = {"method": spec, "label": "white-box KD (upper bound: needs the teacher's logits)",
                   "queries_per_pair": None, "total_queries": None}
            make = lambda: (sub.x, sub.y, teacher_logits_whitebox(teacher_path, sub.x, device))  # noqa: E731
        else:
            res, rpath = results[method]
            extra, tl = _soft_row(method, budget, res)
            row = {"method": spec, "label": f"DB3KD-{method.upper()}", **extra}
            key_parts.append(rpath.name)
            make = lambda tl=tl: (sub.x, sub.y, tl)  # noqa: E731
        row.update(_train_row(spec, run, cfg, key_parts, make, val, test, num_classes, progress))
        rows.append(row)
    report = {
        "name": cfg.name, "mode": "db3kd",
        "teacher": {**teacher_metrics, "sha256": teacher_sha, "path": str(teacher_path)},
        "data": {"name": cfg.data.name, "subset": len(sub), "val": len(splits.val), "test": len(splits.test)},
        "robustness": {m: {k: r.provenance.get(k) for k in ("total_queries", "wall_time_s", "queries_per_s")}
                       for m, (r, _) in results.items()},
        "students": rows,
    }
    return report, {}


def _run_zero_shot(cfg, run, teacher_path, teacher_sha, teacher_metrics, progress):
    """ZSDB3KD: nothing after the teacher stage sees real training data (only the test
    set, once per student, for the final accuracy)."""
    from .synthesis import PseudoSamples, SynthesisSettings, label_random_images, synthesize

    device = cfg.device
    test = load_dataset(cfg.data.name, cfg.data.root, "test")
    num_classes = len(test.classes)
    teacher_metrics["test_acc"] = _teacher_test_acc(load_oracle(teacher_path, device=device), test, teacher_metrics)
    log(f"teacher test accuracy {teacher_metrics['test_acc']:.2f}%")
    oracle = load_oracle(teacher_path, device=device, budget=cfg.query_budget)
    sy = cfg.synthesis
    ss = _synthesis_settings(cfg)
    pkey = _key("synthesis", teacher_sha, ss.key())
    ppath = run / f"pseudo-{pkey}.safetensors"
    if ppath.exists():
        log(f"synthesis: reusing {ppath.name}")
        pseudo = PseudoSamples.load(ppath)
    else:
        log(f"synthesis: {sy.per_class} x {num_classes} pseudo samples, {sy.iterations} rounds")
        pseudo = synthesize(oracle, ss, device=device, work_dir=ppath.with_name(ppath.name + ".parts"),
                            progress=progress)
        pseudo.save(ppath)
        import shutil

        shutil.rmtree(ppath.with_name(ppath.name + ".parts"), ignore_errors=True)
    q_syn = int(pseudo.provenance["total_queries"])
    log(f"synthesis: {q_syn:,} queries; mean boundary distance {pseudo.mean_distance[0]:.3f} -> "
        f"{pseudo.mean_distance[-1]:.3f}")
    # held-out slice of the pseudo samples for model selection (stratified, deterministic)
    tr_idx, va_idx = train_val_split(pseudo.y, cfg.student.val_fraction, cfg.seed)
    px, py = pseudo.x[tr_idx], pseudo.y[tr_idx]
    val = (pseudo.x[va_idx], pseudo.y[va_idx])
    tst = (test.x, test.y)
    pool = CandidatePool(px.to(device), py.to(device))  # initial directions: pseudo samples of the target class
    needed = {parse_student_method(s, cfg)[0] for s in cfg.student.methods}
    results: dict[str, tuple[RobustnessResult, Path]] = {}
    for method in cfg.robustness.methods:
        if method in needed:
            results[method] = _stage_robustness(oracle, method, px, tr_idx, pool, cfg, run, teacher_sha, pkey,
                                                f"pseudo-{pkey}", progress)
    rows = []
    max_total = q_syn
    specs = [parse_student_method(s, cfg) + (s,) for s in cfg.student.methods]
    for method, budget, spec in specs:
        if method == "random-ce":
            max_total = max(max_total, cfg.student.random_samples)
        elif method not in ("noise-ce", "zs-ce"):
            max_total = max(max_total, _soft_row(method, budget, results[method][0], q_syn)[0]["total_queries"])
    for method, budget, spec in specs:
        key_parts = [teacher_sha, pkey]
        epochs = None
        if method == "zs-ce":
            row = {"method": spec, "label": "pseudo samples, hard labels", "queries_per_pair": 0,
                   "total_queries": q_syn}
            make = lambda: (px, py, None)  # noqa: E731
        elif method == "noise-ce":
            n = cfg.student.noise_samples or min(max_total, cfg.student.noise_cap)
            # the same number of optimisation steps as the pseudo-sample students (same compute)
            epochs = max(1, round(cfg.student.epochs * len(px) / n))
            row = {"method": spec, "label": f"uniform noise, hard labels ({n:,} samples, {epochs} epochs)",
                   "queries_per_pair": 0, "total_queries": n}
            key_parts.append(n)

            def make(n=n):
                g = torch.Generator().manual_seed(cfg.seed + 104729)
                xs = torch.rand(n, *oracle.input_shape, generator=g)
                return xs, oracle(xs.to(device)).cpu(), None
        elif method == "random-ce":
            st = cfg.student
            n_train = st.random_samples - st.random_val
            epochs = st.random_epochs
            row = {"method": spec, "label": f"random {st.random_kind} images, hard labels ({n_train:,} samples, "
                                            f"{epochs} epochs; selection on {st.random_val:,} more)",
                   "queries_per_pair": 0, "total_queries": st.random_samples}
            key_parts = [teacher_sha, st.random_kind, st.random_samples, st.random_val]

            def make(st=st, n_train=n_train):
                parts = run / f"random-{st.random_kind}-{teacher_sha[:12]}-s{cfg.seed}.labels"  # kept: labels cost queries
                xs, ys = label_random_images(oracle, st.random_kind, st.random_samples, cfg.seed, device=device,
                                             work_dir=parts, progress=progress)
                return xs[:n_train], ys[:n_train], None, (xs[n_train:], ys[n_train:])
        else:
            res, rpath = results[method]
            extra, tl = _soft_row(method, budget, res, q_syn)
            row = {"method": spec, "label": f"ZSDB3KD-{method.upper()}", **extra}
            key_parts.append(rpath.name)
            make = lambda tl=tl: (px, py, tl)  # noqa: E731
        row.update(_train_row(spec, run, cfg, key_parts, make, val, tst, num_classes, progress, epochs))
        rows.append(row)
    report = {
        "name": cfg.name, "mode": "zero-shot",
        "teacher": {**teacher_metrics, "sha256": teacher_sha, "path": str(teacher_path)},
        "data": {"name": cfg.data.name, "subset": len(px), "val": len(va_idx), "test": len(test),
                 "note": "subset/val are pseudo samples; no real training image or label is used"},
        "synthesis": {**pseudo.provenance, "mean_distance": pseudo.mean_distance.tolist()},
        "robustness": {m: {k: r.provenance.get(k) for k in ("total_queries", "wall_time_s", "queries_per_s")}
                       for m, (r, _) in results.items()},
        "students": rows,
    }
    return report, {"pseudo": pseudo, "classes": test.classes}


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


def write_report(run: Path, report: dict[str, Any], extras: dict[str, Any] | None = None) -> Path:
    """``report.md`` (a table), ``report.json`` and plots in ``run``: accuracy against queries
    per pair and, for zero-shot runs, pseudo-sample grids per snapshot and the distance curve."""
    extras = extras or {}
    t = report["teacher"]
    d = report["data"]
    zero = report.get("mode") == "zero-shot"
    if zero:
        data_line = (f"Transfer set: {d['subset']:,} pseudo samples synthesised from noise (no real training data); "
                     f"selection on {d['val']:,} held-out pseudo samples; test on {d['test']:,} real test images of "
                     f"{d['name']}.")
    else:
        data_line = (f"Distillation subset: {d['subset']:,} training images of {d['name']}; selection on "
                     f"{d['val']:,} held-out training images; test on {d['test']:,}.")
    lines = [
        f"# {report['name']}",
        "",
        f"Teacher `{t.get('arch', t.get('path'))}`: test accuracy {_fmt(t.get('test_acc'))}% "
        f"(sha256 `{t['sha256'][:12]}`). {data_line}",
        "",
        "| student | method | budget per pair | mean queries per pair | total teacher queries | soft-label time (s) "
        "| train time (s) | val acc (%) | test acc (%) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["students"]:
        lines.append(
            f"| {r['method']} | {r.get('label', '')} | {_fmt(r.get('queries_per_pair'))} | "
            f"{_fmt(r.get('mean_queries_per_pair'), 1)} | "
            f"{_fmt(r.get('total_queries'))} | {_fmt(r.get('soft_label_time_s'), 1)} | "
            f"{_fmt(r.get('train_time_s'), 1)} | {_fmt(r.get('val_acc'))} | {_fmt(r.get('test_acc'))} |")
    if zero:
        syn = report["synthesis"]
        md_curve = ", ".join(f"{v:.3f}" for v in syn["mean_distance"])
        lines += ["", f"Synthesis: {syn['n']:,} pseudo samples, {_fmt(syn['queries_noise'])} queries for class noise "
                  f"+ {_fmt(syn['queries_push'])} for boundary pushing = {_fmt(syn['total_queries'])} queries, "
                  f"{_fmt(syn['wall_time_s'], 1)} s. Mean untargeted boundary distance per round: {md_curve}.", "",
                  "![distance curve](synthesis_distance.png)", ""]
        for it in sorted(extras.get("pseudo").snapshots) if extras.get("pseudo") is not None else []:
            lines.append(f"![pseudo samples, round {it}](pseudo_round{it}.png)")
    lines += ["", "Soft-label stage (teacher queries, wall time, queries per second):", ""]
    for m, info in report["robustness"].items():
        lines.append(f"- {m}: {_fmt(info.get('total_queries'))} queries, {_fmt(info.get('wall_time_s'), 1)} s, "
                     f"{_fmt(info.get('queries_per_s'), 0)} q/s")
    lines += ["", f"Total wall time of this invocation: {report['wall_time_s']} s.", "",
              "![accuracy vs queries](accuracy_vs_queries.png)", ""]
    md = run / "report.md"
    md.write_text("\n".join(lines))
    _write_json(run / "report.json", report)
    _plot(run / "accuracy_vs_queries.png", report)
    if zero and extras.get("pseudo") is not None:
        _plot_synthesis(run, extras["pseudo"], extras.get("classes"))
    log(f"report: {md}")
    return md


def _plot_synthesis(run: Path, pseudo, classes) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(range(len(pseudo.mean_distance)), pseudo.mean_distance.tolist(), "o-")
    ax.set_xlabel("synthesis round")
    ax.set_ylabel("mean untargeted boundary distance (L2)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "synthesis_distance.png", dpi=120)
    plt.close(fig)
    K = int(pseudo.y.max()) + 1
    per = 8
    for it, xs in pseudo.snapshots.items():
        fig, axes = plt.subplots(K, per, figsize=(per * 0.8, K * 0.85))
        for c in range(K):
            members = torch.nonzero(pseudo.y == c).squeeze(1)[:per]
            for j in range(per):
                a = axes[c, j]
                a.axis("off")
                if j < members.numel():
                    img = xs[members[j]]
                    a.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray", vmin=0, vmax=1)
            axes[c, 0].set_title(str(classes[c]) if classes else str(c), fontsize=6, loc="left")
        fig.suptitle(f"pseudo samples per class, round {it}", fontsize=8)
        fig.tight_layout()
        fig.savefig(run / f"pseudo_round{it}.png", dpi=100)
        plt.close(fig)


def _plot(path: Path, report: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    curves: dict[str, list[tuple[int, float]]] = {}
    for r in report["students"]:
        name, _, _ = r["method"].partition("@")
        if name in ("ce", "whitebox-kd", "sd", "noise-ce", "zs-ce", "random-ce"):
            style = {"ce": ("k", ":"), "whitebox-kd": ("tab:green", "--"), "sd": ("tab:gray", "-."),
                     "noise-ce": ("tab:red", ":"), "zs-ce": ("k", "--"), "random-ce": ("tab:blue", "-.")}[name]
            ax.axhline(r["test_acc"], color=style[0], ls=style[1], label=f"{r['method']} ({r['test_acc']:.2f}%)")
        else:
            curves.setdefault(name, []).append((r.get("mean_queries_per_pair") or r["queries_per_pair"], r["test_acc"]))
    for name, pts in curves.items():
        pts.sort()
        prefix = "ZSDB3KD" if report.get("mode") == "zero-shot" else "DB3KD"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{prefix}-{name.upper()}")
    ax.set_xlabel("teacher queries spent per (sample, target) pair (mean)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(report["name"])
    if curves:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
