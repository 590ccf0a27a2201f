"""The run file: one TOML file describes a whole experiment (torchdistill-style).

Each section is a settings class the library and the command line share: ``[data]``
(:class:`~zsdb3kd.data.DataSettings`), ``[teacher]`` (how to read or train the teacher),
``[robustness]`` (:class:`~zsdb3kd.robustness.SearchFields`), ``[synthesis]``
(:class:`~zsdb3kd.synthesis.SynthesisFields`), ``[student]`` and ``[budget]``
(:class:`~zsdb3kd.budget.BudgetSettings`, the recipe of the ``budgeted@N`` students). Unknown
keys, wrong types and impossible combinations are reported at load time, all at once,
naming the key, the value and what was expected. Nothing in a config file is executed.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..budget import BudgetSettings
from ..data import DataSettings
from ..distill import TrainSettings
from ..models import MODELS
from ..oracle import TeacherReading, TeacherSpec, is_url
from ..robustness import SearchFields, create_estimator, parse_method
from ..settings import ConfigError, Device, Settings, validate
from ..synthesis import SynthesisFields

#: student methods that need no boundary distances, per mode
BASELINES = {"db3kd": ("ce", "whitebox-kd"), "zero-shot": ("noise-ce", "zs-ce", "random-ce")}
#: students of the budgeted engine, ``<kind>@<total queries>``, per mode
BUDGETED = {"db3kd": ("budgeted", "budgeted-pool", "random"), "zero-shot": ("budgeted", "random")}


def _known_arch(v: str) -> str:
    if v not in MODELS:
        raise ValueError(f"unknown architecture; known: {', '.join(MODELS.list())}")
    return v


class DataSection(DataSettings):
    """Data: which dataset, where, how it is split, and which training images get soft labels."""

    subset: int = Field(2000, ge=1, description="db3kd: training images that get soft labels and train the students")


class TeacherSection(TeacherReading, TrainSettings):
    """Teacher: an existing one (``path``) or one trained here on the real training data."""

    path: str | None = Field(None, description="an existing teacher (weights, .onnx or a label server URL) "
                                               "instead of training one")
    arch: str = Field("lenet5", description="architecture to train (or of a plain state-dict path)")
    epochs: int = Field(20, ge=1, description="passes over the training set")
    batch_size: int = Field(256, ge=1, description="images per step")

    _arch = field_validator("arch")(_known_arch)

    def spec(self, path: str | os.PathLike) -> TeacherSpec:
        return TeacherSpec(path=str(path), **{k: getattr(self, k) for k in TeacherReading.model_fields})


class RobustnessSection(SearchFields):
    """Robustness: the boundary-distance methods to run and how each pair is searched."""

    methods: list[str] = Field(["sd", "hybrid"], description="method specs, e.g. 'mbd' or 'hybrid:reuse=0.5'")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for spec in v:
            create_estimator(spec)
        return v


class StudentSection(TrainSettings):
    """Students: the architecture, which students to train, and how."""

    arch: str = Field("lenet5-half", description="student architecture")
    methods: list[str] = Field(["ce", "sd", "hybrid@1000"], description="baselines (db3kd: ce, whitebox-kd; "
                               "zero-shot: noise-ce, zs-ce, random-ce), '<robustness method>@<queries "
                               "per pair>', or budgeted students '<budgeted|budgeted-pool|random>@<total queries>'")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="zero-shot: share of pseudo samples held out for "
                                                             "selection")
    noise_samples: int | None = Field(None, ge=1, description="noise-ce: images (default: the zero-shot query total, "
                                                              "at most noise_cap)")
    noise_cap: int = Field(100_000, ge=1, description="noise-ce: the most images by default")
    random_kind: Literal["smooth", "paper", "mixed", "uniform"] = Field(
        "smooth", description="random-ce: the random images (smooth: low-frequency blobs)")
    random_samples: int = Field(1_000_000, ge=2, description="random-ce: teacher-labelled images, held-out ones "
                                                             "included")
    random_val: int = Field(10_000, ge=1, description="random-ce: images held out for model selection")
    random_epochs: int = Field(5, ge=1, description="random-ce: epochs")

    _arch = field_validator("arch")(_known_arch)

    @model_validator(mode="after")
    def _random(self) -> "StudentSection":
        if self.random_val >= self.random_samples:
            raise ValueError("random_val must be smaller than random_samples")
        return self


class RunConfig(Settings):
    """A whole experiment."""

    name: str = Field("experiment", description="run name (default run directory runs/<name>)")
    mode: Literal["db3kd", "zero-shot"] = Field("db3kd", description="db3kd: real training images; zero-shot: none")
    seed: int = Field(0, description="random seed of every stage")
    device: Device = Field("cpu", description="cpu, cuda or cuda:N")
    query_budget: int | None = Field(None, ge=1, description="the most teacher queries the whole run may spend")
    data: DataSection = DataSection()
    teacher: TeacherSection = TeacherSection()
    robustness: RobustnessSection = RobustnessSection()
    synthesis: SynthesisFields = SynthesisFields()
    student: StudentSection = StudentSection()
    budget: BudgetSettings = BudgetSettings()

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        for spec in self.student.methods:
            parse_student_method(spec, self)
        if self.teacher.path and is_url(self.teacher.path) and "whitebox-kd" in self.student.methods:
            raise ValueError("student method whitebox-kd reads the teacher's logits: it needs teacher.path to be a "
                             "file, not a URL")
        rs = self.student
        if "random-ce" in rs.methods and self.query_budget is not None and rs.random_samples > self.query_budget:
            raise ValueError(f"student.random_samples ({rs.random_samples:,}) exceeds query_budget "
                             f"({self.query_budget:,}): each random image costs one query")
        return self


def needs_pseudo_samples(cfg: "RunConfig") -> bool:
    """Whether a zero-shot run's students need the paper's pseudo samples (the budgeted
    engine's rows make their own images)."""
    return any(spec.partition("@")[0] not in BUDGETED["zero-shot"] for spec in cfg.student.methods)


def parse_student_method(spec: str, cfg: RunConfig) -> tuple[str, int | None]:
    """``(kind, queries per pair)``: a baseline of the mode with ``None``, or a robustness method
    spec of ``[robustness] methods`` with the budget after ``@`` (default: ``queries_per_pair``)."""
    if spec in BASELINES[cfg.mode]:
        return spec, None
    kind, at, total = spec.partition("@")
    if kind in BUDGETED["db3kd"]:
        if kind not in BUDGETED[cfg.mode]:
            raise ValueError(f"student method {spec!r}: {kind} needs real unlabelled images (mode db3kd)")
        if not at or not total.isdigit() or int(total) < 1:
            raise ValueError(f"student method {spec!r}: write {kind}@<total queries>, e.g. {kind}@10000")
        return kind, int(total)
    other = {b for bs in BASELINES.values() for b in bs}
    if spec in other:
        raise ValueError(f"student method {spec!r} is not available in mode {cfg.mode!r}; baselines there: "
                         f"{', '.join(BASELINES[cfg.mode])}")
    method, at, b = spec.rpartition("@") if "@" in spec else (spec, "", "")
    rob = cfg.robustness
    if method not in rob.methods:
        raise ValueError(f"student method {spec!r}: {method!r} is not among robustness.methods {rob.methods}")
    budget = rob.queries_per_pair
    if at:
        try:
            budget = int(b)
        except ValueError:
            raise ValueError(f"student method {spec!r}: the queries per pair after '@' must be an integer") from None
        if budget > rob.queries_per_pair:
            raise ValueError(f"student method {spec!r}: {budget} exceeds robustness.queries_per_pair "
                             f"{rob.queries_per_pair}")
        if budget != rob.queries_per_pair and budget not in rob.checkpoints and parse_method(method)[0] != "sd":
            raise ValueError(f"student method {spec!r}: {budget} is not a recorded budget; add it to "
                             f"robustness.checkpoints {list(rob.checkpoints)}")
    return method, budget


def load_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a run file (TOML; nothing in it is executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return validate(RunConfig, raw, where=str(path))
