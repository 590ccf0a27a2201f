"""Whole experiments (``zsdb3kd.experiment``): DB3KD and zero-shot runs end to end on a small
Fashion-MNIST npz copy, stage reuse, run-directory protection and config validation.

One LeNet-5 teacher is trained once for the module (6,000 training images, 3 epochs, lr 1e-2;
79.5% test accuracy on the 2,000 test images used here).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file
import pytest
from conftest import fmnist_npz
import torch

import zsdb3kd.data
from zsdb3kd.cli import main
from zsdb3kd.data import DEFAULT_ROOTS, load_dataset
from zsdb3kd.experiment import RunConfig, load_config, parse_student_method, plan_experiment, run_experiment
from zsdb3kd.experiment.config import DataSection, RobustnessSection, StudentSection, TeacherSection
from zsdb3kd.oracle import LabelOracle, load_oracle
from zsdb3kd.settings import ConfigError
from zsdb3kd.synthesis import PseudoSamples, SynthesisFields

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:matplotlib")

FMNIST = Path(DEFAULT_ROOTS["fashion-mnist"])
if not FMNIST.is_dir():
    pytest.skip(f"Fashion-MNIST not installed at {FMNIST}", allow_module_level=True)

N_TRAIN, N_TEST, VAL = 6000, 2000, 500
SUBSET = 100
K = 10




@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return fmnist_npz(tmp_path_factory.mktemp("fmnist-npz"), N_TRAIN, N_TEST)


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("teacher") / "lenet5.safetensors"
    # seed anyway so the fixture does not depend on the tests that ran before it
    # here so the teacher does not depend on which tests ran before in this process
    torch.manual_seed(0)
    with _quiet():
        rc = main(["train-teacher", "--data", "npz", "--data-root", str(data_dir), "--val-size", str(VAL),
                   "--arch", "lenet5", "--epochs", "3", "--lr", "1e-2", "--out", str(path), "--no-progress"])
    assert rc == 0
    return path


@pytest.fixture(scope="module")
def test_set(data_dir):
    return load_dataset("npz", data_dir, "test")


def _teacher_acc(teacher, test_set) -> float:
    return float((load_oracle(teacher)(test_set.x) == test_set.y).float().mean() * 100)


def test_teacher_is_good_enough(teacher, test_set):
    assert len(test_set) == N_TEST
    assert _teacher_acc(teacher, test_set) >= 75.0  # measured 79.5%


class QueryLog:
    """Records every batch any LabelOracle is asked (monkeypatched ``LabelOracle.__call__``)."""

    def __init__(self, monkeypatch):
        self.batches: list[torch.Tensor] = []
        orig = LabelOracle.__call__

        def spy(oracle, x):
            self.batches.append(x.detach().cpu().clone())
            return orig(oracle, x)

        monkeypatch.setattr(LabelOracle, "__call__", spy)

    @property
    def total(self) -> int:
        return sum(len(b) for b in self.batches)


# ---------------------------------------------------------------------------------------
# config files and validation
# ---------------------------------------------------------------------------------------

STUDENTS_DB = ["ce", "whitebox-kd", "sd", "mbd@100", "mbd@200"]


def _db3kd_toml(data_dir, teacher, name="db3kd-e2e") -> str:
    return f"""
name = "{name}"
mode = "db3kd"
seed = 0

[data]
name = "npz"
root = {json.dumps(str(data_dir))}
val_size = {VAL}
subset = {SUBSET}

[teacher]
path = {json.dumps(str(teacher))}

[robustness]
methods = ["sd", "mbd"]
queries_per_pair = 200
checkpoints = [100, 200]
chunk_size = 100

[student]
methods = {json.dumps(STUDENTS_DB)}
epochs = 5
batch_size = 64
lr = 0.01
"""


def _db3kd_config(data_dir, teacher, name="db3kd-e2e") -> RunConfig:
    return RunConfig(
        name=name, mode="db3kd", seed=0,
        data=DataSection(name="npz", root=str(data_dir), val_size=VAL, subset=SUBSET),
        teacher=TeacherSection(path=str(teacher)),
        robustness=RobustnessSection(methods=["sd", "mbd"], queries_per_pair=200, checkpoints=[100, 200],
                                     chunk_size=100),
        student=StudentSection(methods=list(STUDENTS_DB), epochs=5, batch_size=64, lr=0.01),
    )


def _write(tmp_path, text, name="run.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_load_config_equals_python_config(tmp_path):
    data_dir, teacher = tmp_path / "data", tmp_path / "T.safetensors"
    cfg = load_config(_write(tmp_path, _db3kd_toml(data_dir, teacher)))
    assert cfg == _db3kd_config(data_dir, teacher)
    # untouched sections keep their defaults
    assert cfg.synthesis == SynthesisFields() and cfg.teacher.arch == TeacherSection().arch


def test_load_config_zero_shot_sections(tmp_path):
    cfg = load_config(_write(tmp_path, """
mode = "zero-shot"
[synthesis]
per_class = 7
snapshots = [0, 3]
noise = "smooth"
[robustness]
methods = ["hsja:n_dirs=2"]
queries_per_pair = 50
checkpoints = [50]
[student]
methods = ["noise-ce", "zs-ce", "hsja:n_dirs=2@50"]
"""))
    assert cfg.mode == "zero-shot"
    assert cfg.synthesis.per_class == 7 and cfg.synthesis.snapshots == (0, 3) and cfg.synthesis.noise == "smooth"
    assert cfg.synthesis.iterations == SynthesisFields().iterations
    assert cfg.robustness.methods == ["hsja:n_dirs=2"]
    assert cfg.student.methods == ["noise-ce", "zs-ce", "hsja:n_dirs=2@50"]
    assert parse_student_method("hsja:n_dirs=2@50", cfg) == ("hsja:n_dirs=2", 50)


@pytest.mark.parametrize("text, words", [
    ("bogus = 1\n", ["bogus"]),
    ("[data]\nsubsett = 5\n", ["subsett", "data"]),
    ("[robustness]\nmethods = ['mbd']\nbudgett = 5\n", ["budgett", "robustness"]),
    ("[robustness]\nmethods = ['mbd']\nbudget = 5\n", ["budget", "renamed to 'queries_per_pair'"]),
    ("[student]\narch = 'lenet6'\n", ["student.arch", "unknown architecture", "lenet5-half"]),
    ("[student]\nepoch = 3\n", ["epoch", "did you mean 'epochs'"]),
    ("[synthesis]\nper_clas = 5\n", ["per_clas", "synthesis"]),
    ("[nosuchsection]\nx = 1\n", ["nosuchsection"]),
])
def test_unknown_key_is_named(tmp_path, text, words):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("text, match", [
    ("[robustness]\nmethods = ['mbd', 'magic']\n[student]\nmethods = ['ce']\n", "magic"),
    ("[robustness]\nmethods = ['mbd']\nqueries_per_pair = 2000\n[student]\nmethods = ['mbd@999999']\n", "999999"),
    ("[robustness]\nmethods = ['mbd:k=0']\n[student]\nmethods = ['ce']\n", "k >= 1"),
    ("[robustness]\nmethods = ['mbd:kk=3']\n[student]\nmethods = ['ce']\n", "kk"),
    ("[robustness]\nmethods = ['mbd']\n[student]\nmethods = ['mbd@lots']\n", "integer"),
    ("[robustness]\nmethods = ['mbd']\n[student]\nmethods = ['bd@100']\n", "bd"),
    ("mode = 'db3kd'\n[robustness]\nmethods = ['mbd']\n[student]\nmethods = ['noise-ce']\n", "noise-ce"),
    ("mode = 'db3kd'\n[robustness]\nmethods = ['mbd']\n[student]\nmethods = ['zs-ce']\n", "zs-ce"),
    ("mode = 'zero-shot'\n[robustness]\nmethods = ['mbd']\n[student]\nmethods = ['ce']\n", "'ce'"),
    ("mode = 'zero-shot'\n[robustness]\nmethods = ['mbd']\n[student]\nmethods = ['whitebox-kd']\n", "whitebox-kd"),
    ("mode = 'few-shot'\n", "mode"),
    ("device = 'tpu'\n", "device"),
    ("[data]\nsubset = 0\n", "subset"),
    ("data = 3\n", "table"),
])
def test_invalid_config_is_refused(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("[data]\nsubset = \"many\"\n", "subset"),
    ("seed = \"x\"\n", "seed"),
    ("[robustness]\nmethods = ['mbd']\nqueries_per_pair = \"lots\"\n[student]\nmethods = ['mbd']\n",
     "queries_per_pair"),
])
def test_wrong_value_type_is_a_config_error(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(_write(tmp_path, text))


@pytest.mark.parametrize("text, key", [
    ("[robustness]\nmethods = ['sd']\n[student]\nmethods = ['sd']\nepochs = 0\n", "epochs"),
    ("[robustness]\nmethods = ['sd']\n[student]\nmethods = ['sd']\nkl_reduction = 'mean'\n", "kl_reduction"),
    ("[robustness]\nmethods = ['mbd']\nqueries_per_pair = 0\n[student]\nmethods = ['mbd']\n", "queries_per_pair"),
    ("[robustness]\nmethods = ['mbd']\nchunk_size = 0\n[student]\nmethods = ['mbd']\n", "chunk_size"),
    ("mode = 'zero-shot'\n[robustness]\nmethods = ['mbd']\n[student]\nmethods = ['zs-ce']\n"
     "[synthesis]\nnoise = 'gaussian'\n", "noise"),
    ("mode = 'zero-shot'\n[robustness]\nmethods = ['mbd']\n[student]\nmethods = ['zs-ce']\n"
     "[synthesis]\nqueries_per_search = 10\nsearch_k = 40\n", "queries_per_search"),
])
def test_invalid_stage_settings_are_refused_up_front(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key):
        load_config(_write(tmp_path, text))


def test_budget_at_the_limit_is_accepted(tmp_path):
    cfg = load_config(_write(tmp_path, "[robustness]\nmethods = ['mbd']\nqueries_per_pair = 300\n"
                                       "[student]\nmethods = ['mbd@300', 'mbd']\n"))
    assert cfg.student.methods == ["mbd@300", "mbd"]
    assert parse_student_method("mbd", cfg) == ("mbd", 300)
    with pytest.raises(ValueError, match="checkpoints"):  # only recorded budgets can be read
        parse_student_method("mbd@120", cfg)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="TOML"):
        load_config(_write(tmp_path, "name = \n[data\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    assert issubclass(ConfigError, ValueError)


def test_run_experiment_validates_before_touching_the_run_dir(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="noise-ce"):
        run_experiment({"student": {"methods": ["noise-ce"]}}, run, progress=False)  # db3kd mode
    assert not run.exists()
    with pytest.raises(ValueError, match="noise-ce"):
        RunConfig(student=StudentSection(methods=["noise-ce"]))


# ---------------------------------------------------------------------------------------
# DB3KD end to end
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db3kd_run(data_dir, teacher, tmp_path_factory):
    base = tmp_path_factory.mktemp("db3kd")
    cfg_path = _write(base, _db3kd_toml(data_dir, teacher))
    run = base / "run"
    t0 = time.perf_counter()
    with _quiet():
        report = run_experiment(cfg_path, run, progress=False)
    return cfg_path, run, report, time.perf_counter() - t0


def _rows(report):
    return {r["method"]: r for r in report["students"]}


def test_db3kd_report(db3kd_run, teacher, test_set):
    cfg_path, run, report, _ = db3kd_run
    for f in ("report.md", "report.json", "accuracy_vs_queries.png", "config.resolved.json"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f
    assert (run / "accuracy_vs_queries.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report, default=str))
    assert report["mode"] == "db3kd"
    assert report["data"] == {"name": "npz", "subset": SUBSET, "val": VAL, "test": N_TEST}
    assert report["teacher"]["test_acc"] == pytest.approx(_teacher_acc(teacher, test_set), abs=1e-3)
    rows = _rows(report)
    assert [r["method"] for r in report["students"]] == STUDENTS_DB
    md = (run / "report.md").read_text()
    for r in report["students"]:
        assert 0.0 <= r["test_acc"] <= 100.0 and 0.0 <= r["val_acc"] <= 100.0
        assert r["test_acc"] > 20.0  # chance is 10%; measured 36-59% after 5 epochs on 100 images
        assert f"| {r['method']} |" in md
        assert f"{r['test_acc']:,.2f}" in md
        stem = f"student-{r['method'].replace('@', '-')}-"
        assert len(list(run.glob(stem + "*.safetensors"))) == 1, stem
    # query accounting
    assert rows["ce"]["total_queries"] == SUBSET and rows["ce"]["queries_per_pair"] == 0
    assert rows["whitebox-kd"]["total_queries"] is None
    assert rows["sd"]["total_queries"] == SUBSET and rows["sd"]["queries_per_pair"] == 0
    assert report["robustness"]["sd"]["total_queries"] == SUBSET
    q100, q200 = rows["mbd@100"]["total_queries"], rows["mbd@200"]["total_queries"]
    assert rows["mbd@100"]["queries_per_pair"] == 100 and rows["mbd@200"]["queries_per_pair"] == 200
    assert SUBSET < q100 <= q200 <= SUBSET * (K - 1) * 200 + SUBSET
    assert q100 <= SUBSET * (K - 1) * 100 + SUBSET
    assert q200 == report["robustness"]["mbd"]["total_queries"]  # 200 is the whole budget
    # the robustness artifacts are in the run dir, their chunk dirs cleaned up
    assert len(list(run.glob("robustness-mbd-*.safetensors"))) == 1
    assert len(list(run.glob("robustness-sd-*.safetensors"))) == 1
    assert not list(run.glob("*.parts"))


def test_report_explains_whitebox_kd_below_hard_labels_by_the_loss_it_used(db3kd_run):
    """The report's reason for white-box KD ending below the hard labels names the loss the
    run used: the summed KL only where the run summed it."""
    from zsdb3kd.experiment.report import findings

    _, _, report, _ = db3kd_run
    wb = next(r for r in report["students"] if r["method"] == "whitebox-kd")
    assert (wb["temperature"], wb["kl_weight"], wb["kl_reduction"]) == (20.0, 1.0, "batchmean")  # the defaults

    def said(reduction: str, wb_acc: float, t: float = 20.0) -> list[str]:
        rows = [{**r, "test_acc": 70.0} if r["method"] == "ce" else
                {**r, "test_acc": wb_acc, "kl_reduction": reduction, "temperature": t}
                if r["method"] == "whitebox-kd" else r for r in report["students"]]
        return [f for f in findings({**report, "students": rows}) if f.startswith("White-box KD")]

    (mean,) = said("batchmean", 67.0)
    assert "T = 20" in mean and "nearly uniform" in mean and '"sum"' not in mean
    (summed,) = said("sum", 67.0)
    assert 'kl_reduction = "sum"' in summed and "T = 20" in summed
    (cool,) = said("batchmean", 67.0, t=4.0)
    assert "enough steps" in cool and f"({SUBSET:,} images)" in cool and "uniform" not in cool
    assert said("batchmean", 69.5) == []  # within a point of the hard labels: nothing to explain


def _numbers(report):
    """The report without its bookkeeping of time and reuse."""
    r = json.loads(json.dumps(report, default=str))
    for k in ("wall_time_s", "stages"):
        r.pop(k)
    for part in [r["teacher"], *r["students"], *r.get("robustness", {}).values()]:
        part.pop("reused", None)
    return r


def _artifacts(run: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime_ns for p in run.iterdir()
            if p.suffix in (".safetensors", ".json") and p.name not in ("report.json", "config.resolved.json")}


def test_db3kd_rerun_reuses_every_stage(db3kd_run, monkeypatch, test_set):
    cfg_path, run, report, _ = db3kd_run
    before = _artifacts(run)
    log = QueryLog(monkeypatch)
    with _quiet():
        again = run_experiment(cfg_path, run, progress=False)
    assert _numbers(again) == _numbers(report)
    assert _artifacts(run) == before  # nothing recomputed, nothing new
    # the rerun says it made nothing, and what its reused stages cost when the first run made them
    first, st = report["stages"], again["stages"]
    assert first["reused"] == [] and st["made"] == [] and sorted(st["reused"]) == sorted(first["made"])
    assert "soft labels (mbd)" in st["reused"] and f"student {STUDENTS_DB[0]}" in st["reused"]
    assert st["time_s"] == first["time_s"] > again["wall_time_s"]
    assert "reused" in (run / "report.md").read_text() and f"{first['time_s']:.1f} s" in (run / "report.md").read_text()
    # no training image went to the teacher: the only queries are the (uncounted) teacher
    # accuracy on the test set
    assert log.total <= N_TEST
    assert all(torch.equal(b, test_set.x[: len(b)]) for b in log.batches)


def test_db3kd_other_config_needs_force(db3kd_run, data_dir, teacher, tmp_path, monkeypatch, test_set):
    _, run0, report, _ = db3kd_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    base = _db3kd_config(data_dir, teacher)
    other = base.replace(student=base.student.replace(methods=["ce", "mbd@100"]))
    with pytest.raises(ConfigError, match="different configuration"):
        run_experiment(other, run, progress=False)
    assert json.loads((run / "report.json").read_text()) == json.loads((run0 / "report.json").read_text())
    assert (run / "config.resolved.json").read_text() == (run0 / "config.resolved.json").read_text()
    log = QueryLog(monkeypatch)
    with _quiet():
        forced = run_experiment(other, run, progress=False, force=True)
    # finished stages are reused by content: same numbers, no new teacher query on training images
    assert [r["method"] for r in forced["students"]] == ["ce", "mbd@100"]
    assert _rows(forced)["ce"] == {**_rows(report)["ce"], "reused": True}
    assert _rows(forced)["mbd@100"] == {**_rows(report)["mbd@100"], "reused": True}
    assert forced["stages"]["made"] == []
    assert all(torch.equal(b, test_set.x[: len(b)]) for b in log.batches)
    assert json.loads((run / "config.resolved.json").read_text())["student"]["methods"] == ["ce", "mbd@100"]


def test_interrupted_student_training_resumes_to_the_same_report(db3kd_run, data_dir, teacher, tmp_path,
                                                                monkeypatch):
    from zsdb3kd import distill

    _, run0, report, _ = db3kd_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    for f in run.glob("student-mbd-200-*"):  # this student is trained again, and interrupted
        f.unlink()
    real, calls = distill.accuracy, {"n": 0}

    def interrupt_third_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    cfg = _db3kd_config(data_dir, teacher)
    with monkeypatch.context() as m:
        m.setattr(distill, "accuracy", interrupt_third_epoch)
        with _quiet(), pytest.raises(KeyboardInterrupt):
            run_experiment(cfg, run, progress=False)
    partial = list(run.glob("student-mbd-200-*.train.pt"))
    assert len(partial) == 1 and torch.load(partial[0], weights_only=True)["state"]["epoch"] == 2
    with _quiet():
        resumed = run_experiment(cfg, run, progress=False)
    a, b = _numbers(resumed), _numbers(report)
    for r in a["students"] + b["students"]:
        r.pop("train_time_s")  # wall time; everything else must be equal
    assert a == b
    assert not list(run.glob("*.train.pt"))


def test_student_budget_between_checkpoints(db3kd_run, data_dir, teacher, tmp_path):
    _, run0, report, _ = db3kd_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    base = _db3kd_config(data_dir, teacher)
    try:
        cfg = base.replace(student=base.student.replace(methods=["mbd@150"]))
        with _quiet():
            rep = run_experiment(cfg, run, progress=False, force=True)  # robustness stage reused
    except ValueError:
        return  # refused up front: fine
    row, r100 = _rows(rep)["mbd@150"], _rows(report)["mbd@100"]
    # the soft labels are those at the 100-query checkpoint (RobustnessResult.at(150)), so the row must
    # say 100 queries per pair and charge the 100-query total
    assert row["queries_per_pair"] == 100
    assert row["total_queries"] == r100["total_queries"]


def test_student_result_does_not_depend_on_other_students(db3kd_run, data_dir, teacher, tmp_path):
    _, run0, report, _ = db3kd_run
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    for f in run.glob("student-*"):
        f.unlink()  # retrain the students, reuse the robustness stage
    base = _db3kd_config(data_dir, teacher)
    cfg = base.replace(student=base.student.replace(methods=["mbd@100"]))
    with _quiet():
        rep = run_experiment(cfg, run, progress=False, force=True)
    assert _rows(rep)["mbd@100"]["val_acc"] == _rows(report)["mbd@100"]["val_acc"]
    assert _rows(rep)["mbd@100"]["test_acc"] == _rows(report)["mbd@100"]["test_acc"]


def test_teacher_behind_a_url_gives_the_same_students(db3kd_run, data_dir, teacher, tmp_path):
    import threading

    from zsdb3kd.oracle import TorchOracle
    from zsdb3kd.serve import make_server
    from zsdb3kd.weights import file_sha256

    _, _, report, _ = db3kd_run
    srv = make_server(TorchOracle.from_file(teacher), model_sha256=file_sha256(teacher))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = srv.url
    try:
        base = _db3kd_config(data_dir, teacher)
        cfg = base.replace(teacher=TeacherSection(path=url), robustness=base.robustness.replace(methods=["sd"]),
                           student=base.student.replace(methods=["ce", "sd"]))
        with _quiet():
            rep = run_experiment(cfg, tmp_path / "run", progress=False)
        with pytest.raises(ValueError, match="whitebox-kd .* not a URL"):
            cfg.replace(student=cfg.student.replace(methods=["whitebox-kd"]))
    finally:
        srv.shutdown()
        srv.server_close()
    assert rep["teacher"]["sha256"] == report["teacher"]["sha256"] == file_sha256(teacher)
    assert rep["teacher"]["path"] == url
    assert rep["teacher"]["test_acc"] == report["teacher"]["test_acc"]
    for m in ("ce", "sd"):
        assert (_rows(rep)[m]["val_acc"], _rows(rep)[m]["test_acc"]) == \
               (_rows(report)[m]["val_acc"], _rows(report)[m]["test_acc"])
    # the test set (the teacher's accuracy) and the images' labels for sd's robustness stage; ce asks for the
    # same 100 labels again, which the server answers from its replay cache without billing them twice
    assert srv.oracle.queries == srv.queries == N_TEST + SUBSET


def _plan(cfg):
    return {r["stage"]: r for r in plan_experiment(cfg)[1]}


def test_plan_bounds_what_the_db3kd_run_spent(db3kd_run, data_dir, teacher):
    _, _, report, _ = db3kd_run
    plan = _plan(_db3kd_config(data_dir, teacher))
    assert plan["teacher accuracy"]["queries"] == N_TEST and not plan["teacher accuracy"]["in_budget"]
    assert plan["robustness[sd]"]["queries"] == SUBSET == report["robustness"]["sd"]["total_queries"]
    assert plan["robustness[mbd]"]["queries"] == SUBSET + SUBSET * (K - 1) * 200
    assert report["robustness"]["mbd"]["total_queries"] <= plan["robustness[mbd]"]["queries"]
    assert plan["student[ce]"]["queries"] == _rows(report)["ce"]["total_queries"] == SUBSET
    assert "student[whitebox-kd]" not in plan  # logits, no label queries


def test_plan_bounds_what_the_zero_shot_run_spent(zero_shot_run, data_dir, teacher):
    _, report, _, _ = zero_shot_run
    plan = _plan(_zero_shot_config(data_dir, teacher))
    assert report["synthesis"]["total_queries"] <= plan["synthesis"]["queries"]
    ss = SynthesisFields(per_class=30, iterations=2, queries_per_search=12, search_k=4)
    # the push rounds alone: 3x the budget in round 0, then 1x, then the final measurement, plus halvings
    push = 30 * K * (12 * 3 + 12 + 12 + 2 * 5)
    assert plan["synthesis"]["queries"] == ss.noise_queries + push
    assert report["synthesis"]["queries_push"] <= push
    n = report["data"]["subset"]
    assert plan[f"robustness[{HSJA}]"]["queries"] == n + n * (K - 1) * ZS_BUDGET
    assert report["robustness"][HSJA]["total_queries"] <= plan[f"robustness[{HSJA}]"]["queries"]
    assert _rows(report)["noise-ce"]["total_queries"] <= plan["student[noise-ce]"]["queries"]
    assert plan["student[random-ce]"]["queries"] == _rows(report)["random-ce"]["total_queries"] == RANDOM_N


def test_run_plan_prints_and_touches_nothing(data_dir, teacher, tmp_path, capsys):
    cfg_path = _write(tmp_path, _db3kd_toml(data_dir, teacher).replace('name = "db3kd-e2e"',
                                                                        'name = "db3kd-e2e"\nquery_budget = 1000'))
    assert main(["run", str(cfg_path), "--run-dir", str(tmp_path / "run"), "--plan"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "run").exists()
    assert re.search(r"robustness\[mbd\] +180,100 ", out), out
    assert re.search(r"total +180,300 +counted against query_budget \(query_budget is 1,000\)", out), out


@pytest.mark.parametrize("budget", [SUBSET - 1, 2 * SUBSET - 1])
def test_a_budget_the_plan_cannot_cover_is_refused_before_any_query(data_dir, teacher, tmp_path, monkeypatch, budget):
    base = _db3kd_config(data_dir, teacher)
    cfg = base.replace(query_budget=budget, student=StudentSection(methods=["sd", "ce"], epochs=1))
    log = QueryLog(monkeypatch)
    with pytest.raises(ConfigError, match=rf"up to {2 * SUBSET:,} teacher queries, more than query_budget.*nothing "
                                          "was spent"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert log.total == 0 and not (tmp_path / "run").exists()
    with _quiet():  # the plan's worst case fits: the run goes through
        report = run_experiment(cfg.replace(query_budget=2 * SUBSET), tmp_path / "run", progress=False)
    assert {r["method"]: r["total_queries"] for r in report["students"]} == {"sd": SUBSET, "ce": SUBSET}


def test_a_student_that_cannot_take_the_input_is_refused_before_any_query(tmp_path, monkeypatch):
    """A teacher trained here on 1x4x6 images (an MLP) and a LeNet-5-half student, which cannot
    take them: refused before the teacher is trained or asked anything."""
    log = QueryLog(monkeypatch)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    x = np.random.default_rng(0).random((40, 4, 6)).astype(np.float32)
    for split in ("train", "test"):
        np.savez(tiny / f"{split}.npz", x=x, y=np.arange(40) % 4)
    cfg = RunConfig(data=DataSection(name="npz", root=str(tiny), val_size=8, subset=8),
                    teacher=TeacherSection(arch="mlp", epochs=1), robustness=RobustnessSection(methods=["sd"]),
                    student=StudentSection(methods=["ce"], epochs=1))
    with pytest.raises(ValueError, match="student architecture 'lenet5-half' cannot take \\(1, 4, 6\\) images.*mlp"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert log.total == 0 and not (tmp_path / "run").exists()
    with _quiet():
        report = run_experiment(cfg.replace(student=cfg.student.replace(arch="cnn-small")), tmp_path / "run",
                                progress=False)
    assert report["students"][0]["total_queries"] == 8


# ---------------------------------------------------------------------------------------
# zero-shot end to end
# ---------------------------------------------------------------------------------------

ZS_BUDGET = 6  # hsja queries per (pseudo sample, target) pair
HSJA = "hsja:n_dirs=1"
RANDOM_N, RANDOM_VAL = 12_000, 1_000  # random-ce: teacher-labelled smooth random images (incl. held out)


def _zero_shot_config(data_dir, teacher, seed=0) -> RunConfig:
    # Small settings found by measurement (this machine, ~13 s per run; the module's teacher: LeNet-5,
    # 79.5% test accuracy). Best zero-shot student (zs-ce / hsja@6) vs noise-ce trained on as many
    # uniform-noise samples as the run's query total (~35k; the noise_cap default does not bind):
    #   seed 0: 44.55 / 46.75 vs 9.85 -> margin 36.9
    #   seed 1: 45.15 / 46.85 vs 9.85 -> margin 37.0
    #   seed 2: 41.85 / 37.15 vs 9.85 -> margin 32.0
    # and, with students seeded before their initialisation (as they now are),
    # 35.8 / 37.4 / 38.4. With other teachers or settings noise-ce reached 24% once and zs-ce 34%,
    # so the asserted margin is 10 points.
    return RunConfig(
        name="zero-shot-e2e", mode="zero-shot", seed=seed,
        data=DataSection(name="npz", root=str(data_dir), val_size=VAL),
        teacher=TeacherSection(path=str(teacher)),
        synthesis=SynthesisFields(per_class=30, iterations=2, snapshots=[0, 1, 2], queries_per_search=12, search_k=4,
                                  search_dirs=2, noise="smooth"),
        robustness=RobustnessSection(methods=[HSJA], queries_per_pair=ZS_BUDGET, checkpoints=[ZS_BUDGET],
                                     chunk_size=512),
        student=StudentSection(arch="lenet5-fifth", methods=["noise-ce", "zs-ce", f"{HSJA}@{ZS_BUDGET}", "random-ce"],
                               epochs=10, batch_size=16, lr=1e-2, random_samples=RANDOM_N, random_val=RANDOM_VAL,
                               random_epochs=2, kl_reduction="sum"),
    )


@pytest.fixture(scope="module")
def zero_shot_run(data_dir, teacher, tmp_path_factory):
    """The zero-shot run with every way of reading the training split booby-trapped."""
    run = tmp_path_factory.mktemp("zero-shot") / "run"
    splits_read: list[str] = []
    real = zsdb3kd.data.load_dataset
    sig = inspect.signature(real)

    def guarded(*args, **kwargs):
        split = sig.bind(*args, **kwargs)
        split.apply_defaults()
        splits_read.append(split.arguments["split"])
        if split.arguments["split"] != "test":
            raise AssertionError(f"the zero-shot chain read the {split.arguments['split']!r} split")
        return real(*args, **kwargs)

    def no_splits(*args, **kwargs):
        raise AssertionError("the zero-shot chain called load_splits (reads the training split)")

    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp, _quiet():
        mp.setattr(zsdb3kd.data, "load_dataset", guarded)
        mp.setattr(zsdb3kd.data.DataSettings, "splits", no_splits)
        report = run_experiment(_zero_shot_config(data_dir, teacher), run, progress=False)
    return run, report, splits_read, time.perf_counter() - t0


def test_zero_shot_never_reads_training_data(zero_shot_run):
    run, report, splits_read, _ = zero_shot_run
    assert splits_read and set(splits_read) == {"test"}
    assert (run / "report.json").is_file()
    assert "no real training" in report["data"]["note"]


def test_zero_shot_artifacts(zero_shot_run, teacher):
    run, report, _, _ = zero_shot_run
    png = b"\x89PNG\r\n\x1a\n"
    for f in ("report.md", "report.json", "accuracy_vs_queries.png", "synthesis_distance.png",
              "pseudo_round0.png", "pseudo_round1.png", "pseudo_round2.png"):
        assert (run / f).is_file(), f
        if f.endswith(".png"):
            assert (run / f).read_bytes()[:8] == png, f
    assert sorted(p.name for p in run.glob("pseudo_round*.png")) == [f"pseudo_round{i}.png" for i in (0, 1, 2)]
    md = (run / "report.md").read_text()
    assert "synthesised from noise" in md and "synthesis_distance.png" in md
    for i in (0, 1, 2):
        assert f"pseudo_round{i}.png" in md
    # the pseudo samples: 30 per class, each labelled by the teacher as its class
    files = list(run.glob("pseudo-*.safetensors"))
    assert len(files) == 1 and not list(run.glob("*.parts"))
    ps = PseudoSamples.load(files[0])
    assert ps.x.shape == (K * 30, 1, 28, 28) and sorted(ps.snapshots) == [0, 1, 2]
    assert torch.equal(load_oracle(teacher)(ps.x), ps.y)
    assert torch.equal(torch.bincount(ps.y, minlength=K), torch.full((K,), 30))
    syn = report["synthesis"]
    assert len(syn["mean_distance"]) == 3
    # a fresh run made every stage; their times add up to the report's stage time
    st = report["stages"]
    assert st["reused"] == [] and not syn["reused"] and {"synthesis", f"soft labels ({HSJA})"} <= set(st["made"])
    assert st["time_s"] == pytest.approx(syn["wall_time_s"] + report["robustness"][HSJA]["wall_time_s"]
                                         + sum(r["train_time_s"] for r in report["students"]), abs=0.2)
    assert report["data"]["subset"] + report["data"]["val"] == K * 30 and report["data"]["test"] == N_TEST


def test_zero_shot_query_accounting(zero_shot_run):
    _, report, _, _ = zero_shot_run
    rows = _rows(report)
    q_syn = report["synthesis"]["total_queries"]
    assert q_syn == report["synthesis"]["queries_noise"] + report["synthesis"]["queries_push"]
    assert rows["zs-ce"]["total_queries"] == q_syn
    soft = rows[f"{HSJA}@{ZS_BUDGET}"]
    assert soft["total_queries"] == q_syn + report["robustness"][HSJA]["total_queries"]
    n = report["data"]["subset"]
    assert soft["total_queries"] <= q_syn + n * (K - 1) * ZS_BUDGET + n
    # the uniform-noise baseline gets as many samples as the most expensive zero-shot student
    noise = rows["noise-ce"]
    assert noise["total_queries"] == min(max(rows["zs-ce"]["total_queries"], soft["total_queries"]),
                                         StudentSection().noise_cap)
    assert f"{noise['total_queries']:,} samples" in noise["label"]
    for r in report["students"]:
        assert 0.0 <= r["test_acc"] <= 100.0


def test_zero_shot_beats_uniform_noise_on_the_same_budget(zero_shot_run):
    """The issue's CI requirement: a small zero-shot run beats the uniform-noise baseline."""
    _, report, _, seconds = zero_shot_run
    rows = _rows(report)
    best = max(rows["zs-ce"]["test_acc"], rows[f"{HSJA}@{ZS_BUDGET}"]["test_acc"])
    assert best >= rows["noise-ce"]["test_acc"] + 10.0, rows
    assert best >= 30.0  # measured 42-48%; chance is 10%


def test_random_ce_uses_its_own_teacher_labelled_images(zero_shot_run, teacher):
    run, report, _, _ = zero_shot_run
    row = _rows(report)["random-ce"]
    # one query per random image (training and held-out slice), nothing else
    assert row["total_queries"] == RANDOM_N and row["queries_per_pair"] == 0
    assert f"{RANDOM_N - RANDOM_VAL:,} samples" in row["label"] and f"{RANDOM_VAL:,} more" in row["label"]
    # the labels are kept in the run directory (they cost queries) and are the teacher's
    from zsdb3kd.synthesis import random_images

    dirs = list(run.glob("random-smooth-*.labels"))
    assert len(dirs) == 1
    y = torch.cat([load_file(str(f))["y"] for f in sorted(dirs[0].glob("chunk-*.safetensors"))])
    x = random_images("smooth", RANDOM_N, (1, 28, 28), seed=0)
    assert torch.equal(y, load_oracle(teacher)(x.float() / 255))
    # selection happened on the held-out random images, not on the pseudo samples' split
    assert 0 <= row["val_acc"] <= 100 and row["best_epoch"] in (0, 1)
    # far above the uniform-noise floor (measured 44.5% vs 9.9%, with half zs-ce's queries)
    assert row["test_acc"] >= _rows(report)["noise-ce"]["test_acc"] + 10.0


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.toml")))
def test_every_shipped_config_loads(path):
    """A typo in a shipped experiment file fails here, not an hour into a run."""
    cfg = load_config(path)
    assert cfg.name and cfg.student.methods
