"""The stages of a run, each also the library call behind one command.

Every stage's artifact is named by a content hash of everything that determines it (data
fingerprint, teacher hash, settings, seed), so a rerun reuses finished stages, and every
long stage resumes after an interruption (robustness by chunk, training by epoch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch

from ..data import Splits
from ..distill import TrainSettings, accuracy, train
from ..models import create_model
from ..oracle import LabelOracle, teacher_sha256
from ..parallel import is_main
from ..robustness import CandidatePool, RobustnessResult, RobustnessSettings, compute_to_file
from ..settings import content_key
from ..store import environment, write_json
from ..weights import save_weights

log = logging.getLogger("zsdb3kd")


def training_checkpoint(out: str | os.PathLike) -> Path:
    """Where the training of the model to be saved at ``out`` keeps its state until it ends:
    an interrupted run resumes from its last finished epoch."""
    out = Path(out)
    return out.with_name(out.name + ".train.pt")


def check_buildable(arch: str, input_shape: tuple[int, ...], num_classes: int, what: str) -> None:
    """Fail before any query if ``arch`` cannot take ``input_shape`` images."""
    try:
        create_model(arch, num_classes=num_classes, input_shape=tuple(input_shape))
    except ValueError as e:
        raise ValueError(f"{what} {arch!r} cannot take {tuple(input_shape)} images ({e}); choose another "
                         "architecture (mlp and cnn-small take any input size)") from None


def train_teacher(splits: Splits, arch: str, out: str | os.PathLike, config: TrainSettings, *, seed: int = 0,
                  device: str = "cpu", progress: bool | None = None) -> dict[str, Any]:
    """Cross-entropy training of a registry model; selects on val, reports test accuracy once."""
    torch.manual_seed(seed)  # initial weights depend on the seed only, not on earlier stages
    model = create_model(arch, num_classes=len(splits.train.classes), input_shape=splits.train.shape)
    res = train(model, splits.train.x, splits.train.y, splits.val.x, splits.val.y, config, seed=seed, device=device,
                desc=f"teacher[{arch}]", progress=progress, checkpoint=training_checkpoint(out))
    test_acc = accuracy(model, splits.test.x, splits.test.y, device=device)
    if is_main():  # under torchrun every rank holds the same weights; rank 0 writes them
        save_weights(model, out, arch=arch, input_shape=splits.train.shape, num_classes=len(splits.train.classes),
                     extra={"test_acc": f"{test_acc:.4f}", "data": splits.train.name})
    return {"arch": arch, "val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch,
            "train_time_s": round(res.wall_time_s, 2), "train_config": config.model_dump(mode="json"), "seed": seed,
            "data": splits.train.name}


def distill_student(arch: str, x: torch.Tensor, y: torch.Tensor, val: tuple[torch.Tensor, torch.Tensor],
                    test: tuple[torch.Tensor, torch.Tensor], config: TrainSettings, out: str | os.PathLike, *,
                    seed: int = 0, teacher_logits: torch.Tensor | None = None, num_classes: int = 10,
                    device: str = "cpu", desc: str = "student", progress: bool | None = None,
                    extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Train a student (CE or KD), select on ``val``, evaluate once on ``test``, save it."""
    torch.manual_seed(seed)  # initial weights depend on the seed only, not on earlier students
    model = create_model(arch, num_classes=num_classes, input_shape=tuple(x.shape[1:]))
    res = train(model, x, y, val[0], val[1], config, seed=seed, teacher_logits=teacher_logits, device=device,
                desc=desc, progress=progress, checkpoint=training_checkpoint(out))
    test_acc = accuracy(model, test[0], test[1], device=device)
    if is_main():
        save_weights(model, out, arch=arch, input_shape=tuple(x.shape[1:]), num_classes=num_classes,
                     extra={"test_acc": f"{test_acc:.4f}", **(extra or {})})
    return {"val_acc": res.best_val_acc, "test_acc": test_acc, "best_epoch": res.best_epoch,
            "train_time_s": round(res.wall_time_s, 2)}


def teacher_key(teacher: Path | str, oracle: LabelOracle | None = None) -> str:
    """What names the teacher in every artifact key: its file's sha256, or for a label server
    the sha256 it reports for its model (else a hash of the URL, with a warning: then a
    changed model behind the same URL would not be noticed)."""
    sha = teacher_sha256(str(teacher), oracle)
    if sha:
        return sha
    log.warning(f"{teacher} reports no model_sha256; artifacts are keyed by the URL alone")
    return hashlib.sha256(f"url:{teacher}".encode()).hexdigest()


def oracle_accuracy(oracle: LabelOracle, x: torch.Tensor, y: torch.Tensor) -> float:
    """The teacher's test accuracy (``len(x)`` label queries)."""
    return float((oracle(x.to(oracle.device)).cpu() == y).float().mean() * 100)


def robustness_stage(oracle: LabelOracle, settings: RobustnessSettings, x: torch.Tensor, indices: torch.Tensor,
                     pool: CandidatePool | None, run: Path, teacher_sha: str, data_key: str, data_name: str,
                     progress: bool | None, device: str = "cpu") -> tuple[RobustnessResult, Path, bool]:
    """Distances of ``x``, their file, and whether it was reused from ``run`` (an artifact with
    the same key existed)."""
    rkey = content_key("robustness", teacher_sha, data_key, indices.tolist(), settings.key(), length=12)
    out = run / f"robustness-{settings.name}-{rkey}.safetensors"
    if out.exists():
        log.info(f"robustness[{settings.method}]: reusing {out.name}")
        return RobustnessResult.load(out), out, True
    per = settings.per_pair()
    log.info(f"robustness[{settings.method}]: {len(x)} samples x {oracle.num_classes - 1} targets"
             + (f", at most {per:,} queries per pair" if per else " (no queries: nearest samples)"))
    res = compute_to_file(out, oracle, x.to(device), settings, pool=pool, indices=indices, progress=progress,
                          provenance={"teacher_sha256": teacher_sha, "data": data_name, "data_key": data_key})
    return res, out, False


def soft_row(method: str, budget: int | None, res: RobustnessResult, extra_queries: int = 0
             ) -> tuple[dict[str, Any], torch.Tensor]:
    """A student row's cost columns and the soft-label logits at ``budget`` queries per pair."""
    free = res.provenance.get("settings", {}).get("method", method).split(":")[0] == "sd"
    d = res.at(budget)
    frac = res.queries_at(budget) / max(1, res.total_queries)
    row = {"queries_per_pair": 0 if free else budget,
           "mean_queries_per_pair": res.mean_queries_per_pair(budget),
           "total_queries": (len(res.indices) if free else res.queries_at(budget)) + extra_queries,
           "soft_label_time_s": round(res.provenance.get("wall_time_s", 0.0) * frac, 1),
           "failed_pairs": int(torch.isinf(d).sum())}
    return row, res.logits(budget)


def student_row(spec: str, arch: str, run: Path, config: TrainSettings, seed: int, key_parts: list,
                make_inputs: Callable[[], tuple], val, test, num_classes: int, device: str, progress,
                epochs: int | None = None) -> dict[str, Any]:
    """Train (or reuse) one student; ``make_inputs()`` -> ``(x, y, teacher_logits[, val])`` is only
    called when needed (a fourth element replaces the validation split)."""
    if epochs is not None:
        config = config.replace(epochs=epochs)
    skey = content_key("student", spec, arch, config.key(), seed, *key_parts, length=12)
    out = run / f"student-{spec.replace('@', '-').replace(':', '_')}-{skey}.safetensors"
    mpath = out.with_suffix(".json")
    if mpath.exists() and out.exists():
        log.info(f"student[{spec}]: reusing {out.name}")
        return {**json.loads(mpath.read_text()), "reused": True}
    inputs = make_inputs()
    x, y, tl = inputs[:3]
    if len(inputs) > 3:
        val = inputs[3]
    log.info(f"student[{spec}]: training {arch} on {len(x):,} images for {config.epochs} epochs")
    metrics = distill_student(arch, x, y, val, test, config, out, seed=seed, teacher_logits=tl,
                              num_classes=num_classes, device=device, desc=f"student[{spec}]", progress=progress,
                              extra={"method": spec})
    metrics["environment"] = environment()
    if is_main():
        write_json(mpath, metrics)
    log.info(f"student[{spec}]: val {metrics['val_acc']:.2f}%  test {metrics['test_acc']:.2f}%")
    return metrics
