"""The budgeted student from the command line and in run files (``zsdb3kd extract``,
``budgeted@N`` rows): exact query bills, checks before the first query, the test split read
once at the end, a real ``kill -9`` resumed to the same student, and a run file's rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import fmnist_npz
from safetensors.torch import load_file

import zsdb3kd.data
from zsdb3kd.cli import main
from zsdb3kd.experiment import load_config, run_experiment
from zsdb3kd.models import create_model
from zsdb3kd.oracle import LabelOracle
from zsdb3kd.settings import ConfigError
from zsdb3kd.weights import save_weights

FAST = ["--rounds", "2", "--epochs-per-round", "1", "--final-epochs", "2", "--pool-factor", "2", "--batch-size", "32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return fmnist_npz(tmp_path_factory.mktemp("npz"), 1200, 300)


def _teacher(path: Path, shape=(1, 28, 28), arch="lenet5") -> Path:
    torch.manual_seed(0)
    save_weights(create_model(arch, num_classes=10, input_shape=shape), path, arch=arch, input_shape=shape,
                 num_classes=10)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return _teacher(tmp_path_factory.mktemp("t") / "teacher.safetensors")


class Spy:
    """Every oracle call and every dataset read, in order."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, object]] = []
        orig_call, orig_load = LabelOracle.__call__, zsdb3kd.data.load_dataset

        def call(oracle, x):
            self.events.append(("query", len(x)))
            return orig_call(oracle, x)

        def load(name, root=None, split="train", **kw):
            self.events.append(("load", split))
            return orig_load(name, root, split, **kw)

        monkeypatch.setattr(LabelOracle, "__call__", call)
        monkeypatch.setattr(zsdb3kd.data, "load_dataset", load)

    @property
    def queries(self) -> int:
        return sum(n for kind, n in self.events if kind == "query")


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_extract_pays_the_budget_exactly_and_reads_the_test_split_once_at_the_end(teacher, data_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    spy = Spy(monkeypatch)
    out = tmp_path / "s.safetensors"
    args = ["extract", "--teacher", str(teacher), "--budget", "300", "--data", "npz", "--data-root", str(data_dir),
            "--out", str(out), *FAST]
    assert main(args) == 0
    metrics = json.loads(Path(f"{out}.json").read_text())
    assert spy.queries == metrics["queries"] == metrics["paid_this_run"] == 300
    loads = [e for e in spy.events if e[0] == "load"]
    assert loads == [("load", "test")] and spy.events[-1] == ("load", "test")  # once, after the last query
    assert 0 <= metrics["test_acc"] <= 100 and out.is_file()
    assert metrics["settings"]["recipe"] == "v2"  # recipe auto on one-channel images
    assert "recipe v2, 300 queries" in capsys.readouterr().out
    spy.events.clear()  # a rerun replays every answer: nothing is paid
    assert main(args) == 0
    assert spy.queries == 0 and json.loads(Path(f"{out}.json").read_text())["paid_this_run"] == 0


def test_extract_with_a_pool_asks_only_about_pool_images(teacher, data_dir, tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    out = tmp_path / "p.safetensors"
    assert main(["extract", "--teacher", str(teacher), "--budget", "200", "--data", "npz", "--data-root",
                 str(data_dir), "--pool", "train", "--out", str(out), *FAST]) == 0
    assert spy.queries == 200
    assert [e for e in spy.events if e[0] == "load"] == [("load", "train"), ("load", "test")]
    asked = torch.cat([load_file(str(f))["x"] for f in sorted(Path(f"{out}.work").glob("round-*.safetensors"))])
    pool = (zsdb3kd.data.load_dataset("npz", data_dir, "train").x * 255).round().to(torch.uint8)
    match = (asked.reshape(200, 1, -1) == pool.reshape(1, len(pool), -1)).all(-1)
    assert bool(match.any(1).all()) and int(match.any(0).sum()) == 200


@pytest.mark.parametrize("extra,words", [
    (["--student", "lenet5", "--no-evaluate"], "cannot take (1, 8, 12) images"),
    (["--query-budget", "100", "--no-evaluate"], "more than --query-budget"),
    (["--pool", "train", "--data", "npz"], "fewer than the budget"),
    (["--budget", "0", "--no-evaluate"], "at least 1 query"),
    (["--acquisition", "oracle", "--no-evaluate"], "--acquisition"),
    (["--data", "fashion-mnist"], "test images are 1x28x28 (C x H x W), the teacher takes 1x8x12"),
    (["--data", "npz", "--data-root", "no/such/dir.npz"], "does not exist"),
    (["--data", "npz", "--data-root", "{wide}"], "test images are 1x28x28 (C x H x W)"),  # from the npz header
    (["--data", "npz", "--data-root", "{colour}"], "test images are 3x8x12 (C x H x W)"),  # (N, H, W, C) layout
    (["--data", "folder", "--data-root", "{folder}"], "test images are ?x9x9 (C x H x W)"),  # its first image
])
def test_extract_refuses_before_any_query(tmp_path, monkeypatch, capsys, extra, words):
    import numpy as np
    from PIL import Image

    teacher = _teacher(tmp_path / "t812.safetensors", shape=(1, 8, 12), arch="mlp")
    roots = {name: tmp_path / name for name in ("pool", "wide", "colour", "folder")}
    for split in ("train", "test"):
        for name, shape in (("pool", (50, 8, 12)), ("wide", (50, 28, 28)), ("colour", (50, 8, 12, 3))):
            roots[name].mkdir(exist_ok=True)
            x = np.zeros(shape if split == "test" else (50, 8, 12), np.float32)
            np.savez(roots[name] / f"{split}.npz", x=x, y=np.zeros(50, np.int64))
        (roots["folder"] / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((9, 9), np.uint8)).save(roots["folder"] / split / "a" / "0.png")
    extra = [e.format(**roots) for e in extra]
    spy = Spy(monkeypatch)
    args = ["extract", "--teacher", str(teacher), "--budget", "500", "--student", "mlp", "--data-root",
            str(roots["pool"]), "--out", str(tmp_path / "s.safetensors"), *extra]
    if "--budget" in extra[:1]:
        args[args.index("500") - 1: args.index("500") + 1] = []
    assert main(args) == 2
    assert words in _err(capsys) and spy.queries == 0
    assert ("load", "test") not in spy.events  # the test split's shape is known without reading it


def test_extract_on_a_non_square_teacher(tmp_path, capsys):
    teacher = _teacher(tmp_path / "t.safetensors", shape=(1, 8, 12), arch="mlp")
    out = tmp_path / "s.safetensors"
    assert main(["extract", "--teacher", str(teacher), "--budget", "120", "--student", "cnn-small", "--no-evaluate",
                 "--out", str(out), *FAST]) == 0
    assert json.loads(Path(f"{out}.json").read_text())["queries"] == 120


def _extract_cmd(teacher, out, budget=1500) -> list[str]:
    return [sys.executable, "-m", "zsdb3kd", "extract", "--teacher", str(teacher), "--budget", str(budget),
            "--no-evaluate", "--out", str(out), "--rounds", "4", "--epochs-per-round", "4", "--final-epochs", "4",
            "--student", "mlp"]


def test_kill_9_mid_run_then_rerun_gives_the_same_student_and_pays_nothing_twice(teacher, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref.safetensors"
    subprocess.run(_extract_cmd(teacher, ref), check=True, env=env, capture_output=True)
    out = tmp_path / "run.safetensors"
    proc = subprocess.Popen(_extract_cmd(teacher, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = Path(f"{out}.work") / "query-r2.safetensors"  # round 2 answered: the kill lands mid-run
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL, "the run finished before it could be killed"
    paid_before = sum(int(load_file(str(f))["labels"].numel()) for f in Path(f"{out}.work").glob("query-*"))
    assert 0 < paid_before < 1500
    subprocess.run(_extract_cmd(teacher, out), check=True, env=env, capture_output=True)
    metrics = json.loads(Path(f"{out}.json").read_text())
    assert metrics["queries"] == 1500 and metrics["paid_this_run"] == 1500 - paid_before
    a, b = load_file(str(ref)), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _toml(data_dir, teacher, methods, mode="db3kd") -> str:
    return f"""
name = "budgeted"
mode = "{mode}"
[data]
name = "npz"
root = {json.dumps(str(data_dir))}
val_size = 200
subset = 100
[teacher]
path = {json.dumps(str(teacher))}
[robustness]
methods = ["sd"]
[student]
methods = {json.dumps(methods)}
epochs = 2
[budget]
rounds = 2
epochs_per_round = 1
final_epochs = 2
pool_factor = 2
"""


def test_run_file_rows_of_the_budgeted_engine(data_dir, teacher, tmp_path, monkeypatch):
    cfg = tmp_path / "run.toml"
    cfg.write_text(_toml(data_dir, teacher, ["ce", "budgeted@200", "budgeted@400", "budgeted-pool@200", "random@200"]))
    spy = Spy(monkeypatch)
    report = run_experiment(cfg, tmp_path / "run", progress=False)
    rows = {r["method"]: r for r in report["students"]}
    for spec, n in (("budgeted@200", 200), ("budgeted@400", 400), ("budgeted-pool@200", 200), ("random@200", 200)):
        assert rows[spec]["total_queries"] == n and 0 <= rows[spec]["test_acc"] <= 100
    assert spy.queries == 300 + 100 + 200 + 400 + 200 + 200  # teacher accuracy, ce, the four budgeted rows
    text = (tmp_path / "run" / "report.md").read_text()
    assert "points against random images for the same bill" in text
    assert (tmp_path / "run" / "accuracy_vs_queries.png").stat().st_size > 0
    spy.events.clear()
    run_experiment(cfg, tmp_path / "run", progress=False)  # every row reused
    assert spy.queries == 300


@pytest.mark.parametrize("methods,mode,words", [
    (["budgeted-pool@100"], "zero-shot", "needs real unlabelled images"),
    (["budgeted@ten"], "db3kd", "budgeted@<total queries>"),
    (["budgeted"], "db3kd", "budgeted@<total queries>"),
])
def test_run_file_budgeted_rows_are_checked_at_load(data_dir, teacher, tmp_path, methods, mode, words):
    cfg = tmp_path / "run.toml"
    cfg.write_text(_toml(data_dir, teacher, methods, mode))
    with pytest.raises(ConfigError, match=words):
        load_config(cfg)


def test_zero_shot_run_of_budgeted_rows_synthesises_nothing(data_dir, teacher, tmp_path, monkeypatch):
    cfg = tmp_path / "run.toml"
    cfg.write_text(_toml(data_dir, teacher, ["budgeted@150", "random@150"], mode="zero-shot"))
    spy = Spy(monkeypatch)
    report = run_experiment(cfg, tmp_path / "run", progress=False)
    assert spy.queries == 300 + 150 + 150 and "synthesis" not in report  # teacher accuracy + the two rows
    assert {e[1] for e in spy.events if e[0] == "load"} == {"test"}  # never the training split
    assert "No real training data" in (tmp_path / "run" / "report.md").read_text()


def test_time_left_is_the_latest_rounds_pace_applied_to_the_rounds_still_to_run(monkeypatch):
    """A round that spends 2 us per image-epoch training and 1 ms per query choosing predicts
    exactly that for the rest; a slow first round (a GPU's warm-up) does not weigh on later
    estimates; the last round says nothing of time left."""
    from zsdb3kd.budget import BudgetSettings
    from zsdb3kd.budget.settings import plan_rounds
    from zsdb3kd.experiment import extract
    from zsdb3kd.experiment.extract import RoundLog

    s = BudgetSettings(rounds=3, init_fraction=0.4, epochs_per_round=5, final_epochs=100)
    plan = plan_rounds(1000, 3, 0.4)
    assert plan == [400, 200, 200, 200]
    work = [400 * 5, 600 * 5, 800 * 5, 1000 * 100]  # image-epochs per round
    log = RoundLog("t", 1000, s)

    def entry(r: int, train_pace: float, choose_pace: float) -> dict:
        return {"round": r, "total_queries": sum(plan[:r + 1]), "agreement_held_out": 50.0,
                "train_s": train_pace * work[r], "choose_s": choose_pace * plan[r]}

    exact = 2e-6 * (work[2] + work[3]) + 1e-3 * (plan[2] + plan[3])
    assert log.seconds_left(entry(1, 2e-6, 1e-3)) == pytest.approx(exact)
    assert log.seconds_left(entry(0, 2e-4, 1e-1)) == pytest.approx(100 * (2e-6 * sum(work[1:]) + 1e-3 * 600))
    said: list[str] = []
    monkeypatch.setattr(extract, "log", type("Log", (), {"info": staticmethod(said.append)}))
    log(entry(1, 2e-6, 1e-3), 4)
    log(entry(3, 2e-6, 1e-3), 4)
    first, last = said
    assert "round 2/4: 600/1,000 queries" in first and f"~{exact:.0f} s left" in first
    assert "round 4/4" in last and "left" not in last


def test_the_plan_counts_every_training_step_of_the_run_and_times_them_before_any_query(teacher, tmp_path,
                                                                                       monkeypatch, capsys):
    """--plan prints the run's training steps and their time here; the run then trains exactly
    that many steps (summed over its rounds' logs); planning asks the teacher nothing."""
    from zsdb3kd.budget import BudgetSettings, plan_rounds
    from zsdb3kd.budget.train import planned_steps

    spy = Spy(monkeypatch)
    out = tmp_path / "s.safetensors"
    args = ["extract", "--teacher", str(teacher), "--budget", "777", "--no-evaluate", "--out", str(out), *FAST]
    assert main([*args, "--plan"]) == 0
    plan_text = capsys.readouterr().out
    assert spy.queries == 0 and not out.exists()
    assert main(args) == 0
    metrics = json.loads(Path(f"{out}.json").read_text())
    steps = sum(entry["steps"] for entry in metrics["rounds"])
    settings = BudgetSettings(**metrics["settings"])
    planned = planned_steps(plan_rounds(777, settings.rounds, settings.init_fraction), settings)
    # the held-out share is drawn image by image, so the plan counts its expected size
    assert steps > 0 and abs(planned - steps) <= 0.03 * steps
    assert f"; recipe v2, about {planned:,} training steps, " in plan_text and " ms each" in plan_text
    # a colour teacher's plan names the recipe auto picks for it, still without a query
    colour = _teacher(tmp_path / "colour.safetensors", shape=(3, 32, 32))
    spy.events.clear()
    assert main(["extract", "--teacher", str(colour), "--budget", "777", "--no-evaluate", "--out",
                 str(tmp_path / "c.safetensors"), *FAST, "--plan"]) == 0
    assert "; recipe v1, about " in capsys.readouterr().out and spy.queries == 0
