"""benchmarks/budget.py keeps one teacher per dataset in a results file: records of another
teacher (other labels, hence other students) are refused before any cell is trained and
when a cell is saved, and the results pages pair only runs of the same teacher."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script("budget_bench", ROOT / "benchmarks" / "budget.py")


def _rec(acc: float = 70.0, teacher_acc: float = 90.78, sha: str | None = None, dataset: str = "fashion-mnist",
         seed: int = 0, method: str = "budgeted") -> dict:
    r = {"dataset": dataset, "method": method, "budget": 10000, "seed": seed, "test_acc": acc, "threads": 1,
         "teacher_acc": teacher_acc, "command": "python benchmarks/budget.py"}
    if sha is not None:
        r["teacher_sha256"] = sha
    return r


def test_teacher_identity_is_the_accuracy_and_the_digest_of_the_weights_file(bench, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"weights one")
    b.write_bytes(b"weights two")
    ident = bench.teacher_identity(a, 91.3649)
    assert ident == {"teacher_acc": 91.36, "teacher_sha256": hashlib.sha256(b"weights one").hexdigest()}
    assert bench.teacher_identity(b, 91.3649)["teacher_sha256"] != ident["teacher_sha256"]


def test_records_of_another_teacher_are_found_by_digest_or_by_accuracy(bench):
    doc = {"records": [_rec(teacher_acc=90.78), _rec(dataset="mnist", teacher_acc=99.22, sha="aa")]}
    same_old = {"teacher_acc": 90.78, "teacher_sha256": "bb"}  # an old record has no digest: accuracy decides
    assert bench.other_teacher(doc, "fashion-mnist", same_old) is None
    retrained = {"teacher_acc": 91.36, "teacher_sha256": "bb"}
    assert bench.other_teacher(doc, "fashion-mnist", retrained) is doc["records"][0]
    assert bench.other_teacher(doc, "mnist", {"teacher_acc": 99.22, "teacher_sha256": "aa"}) is None
    assert bench.other_teacher(doc, "mnist", {"teacher_acc": 99.22, "teacher_sha256": "cc"}) is doc["records"][1]
    assert bench.other_teacher(doc, "cifar10", {"teacher_acc": 73.0, "teacher_sha256": "dd"}) is None  # no records yet
    with pytest.raises(SystemExit, match=r"another teacher \(test accuracy 90.78%, this one 91.36%\).*--out"):
        bench.refuse_other_teacher(doc, "fashion-mnist", {"teacher_acc": 91.36, "teacher_sha256": "bb"}, Path("x.json"))


def test_a_cell_of_another_teacher_is_not_saved(bench, tmp_path):
    out = tmp_path / "budget.json"
    bench.save_cell(out, _rec(seed=0, teacher_acc=90.78, sha="aa"), "cmd")
    bench.save_cell(out, _rec(seed=1, teacher_acc=90.78, sha="aa"), "cmd")  # same teacher: kept beside it
    before = out.read_text()
    with pytest.raises(SystemExit, match="another teacher"):
        bench.save_cell(out, _rec(seed=2, teacher_acc=91.36, sha="bb"), "cmd")
    assert out.read_text() == before
    assert [r["seed"] for r in json.loads(before)["records"]] == [0, 1]


def test_the_pages_pair_a_lever_only_with_the_recipe_of_the_same_teacher():
    pages = load_script("results_pages", ROOT / "scripts" / "results_pages.py")
    doc = {"records": [_rec(70.0, seed=0), _rec(74.0, seed=1, teacher_acc=91.36),
                       _rec(71.0, seed=0, method="budgeted-x"), _rec(90.0, seed=1, method="budgeted-x")]}
    rows = [line for line in pages.paired_table(doc).splitlines() if line.startswith("| fashion-mnist ")]
    assert rows == ["| fashion-mnist | 10,000 | `budgeted-x` | `budgeted` | 1 | 71.00 | 70.00 | +1.00 | 1 of 1 |"]


def test_a_cell_of_another_recipe_under_the_same_name_is_not_saved(bench, tmp_path):
    """A budgeted record names its recipe (the hash of its full settings): when the defaults
    change, what `budgeted` means changes, and the new cells may not join the old ones."""
    now = bench.settings_key("budgeted", {})
    assert now == bench.settings_key("budgeted", {}) != bench.settings_key("budgeted", {"mixup": 0.0})
    assert bench.settings_key("random", {}) is None
    # the first recipe by name has the key its records carried while it was the default
    assert bench.settings_key(*bench.parse("budgeted-v1")) == "740b77bcd607a2a0"
    assert bench.settings_key(*bench.parse("budgeted-combo")) == now
    out = tmp_path / "budget.json"
    bench.save_cell(out, _rec(seed=0), "cmd")  # an older record without a key: not compared
    bench.save_cell(out, {**_rec(seed=1), "settings_key": now}, "cmd")
    bench.save_cell(out, {**_rec(seed=0, method="budgeted-mixup"), "settings_key": "other"}, "cmd")  # other name
    before = out.read_text()
    with pytest.raises(SystemExit, match="budgeted records measured with other settings.*--out"):
        bench.save_cell(out, {**_rec(seed=2), "settings_key": "0123456789abcdef"}, "cmd")
    assert out.read_text() == before


@pytest.mark.parametrize("bad", ["fashion-mnist", "imagenet=/data", "mnist="])
def test_a_bad_data_root_stops_before_any_teacher_or_cell(bench, monkeypatch, tmp_path, bad):
    monkeypatch.setattr(sys, "argv", ["budget.py", "--data-root", bad, "--teacher-dir", str(tmp_path / "none"),
                                      "--out", str(tmp_path / "out.json")])
    with pytest.raises(SystemExit, match="NAME=DIR"):
        bench.main()
    assert not (tmp_path / "none").exists() and not (tmp_path / "out.json").exists()


def test_each_budgeted_cell_resumes_from_its_own_folder(bench, tmp_path):
    ident = {"teacher_sha256": "ab" * 32}
    key = ("fashion-mnist", "budgeted", 10000, 0)
    d = bench.cell_dir(str(tmp_path), key, "k" * 64, ident, "cpu")
    assert d.parent == tmp_path and bench.cell_dir(str(tmp_path), key, "k" * 64, ident, "cpu") == d
    others = [bench.cell_dir(str(tmp_path), ("fashion-mnist", "budgeted", 10000, 1), "k" * 64, ident, "cpu"),
              bench.cell_dir(str(tmp_path), key, "j" * 64, ident, "cpu"),  # another recipe under the same name
              bench.cell_dir(str(tmp_path), key, "k" * 64, {"teacher_sha256": "cd" * 32}, "cpu"),
              bench.cell_dir(str(tmp_path), key, "k" * 64, ident, "cuda")]
    assert len({d, *others}) == 5
    assert bench.cell_dir("", key, "k" * 64, ident, "cpu") is None  # --work-dir '': nothing kept


def test_a_resumed_cell_reports_the_whole_runs_queries(bench, tmp_path):
    from test_budget import FAST, SHAPE, oracle_for

    first = oracle_for(SHAPE)
    bench.run_budgeted(first, "mlp", 120, 0, FAST.model_dump(), None, work_dir=tmp_path)
    again = oracle_for(SHAPE)
    model, spent = bench.run_budgeted(again, "mlp", 120, 0, FAST.model_dump(), None, work_dir=tmp_path, name="cell")
    assert first.queries == 120 and again.queries == 0 and spent == 120
