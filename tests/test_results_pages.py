"""The results pages are generated from the JSON their benchmarks wrote: every table in
docs/results/ (and the README's headline) is what scripts/results_pages.py renders now, and
no page carries a hand-written results table outside a generated block."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _pages_module():
    spec = importlib.util.spec_from_file_location("results_pages", ROOT / "scripts" / "results_pages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_generated_block_is_what_its_json_gives():
    assert _pages_module().main(["--check"]) == 0


def test_a_page_edited_by_hand_is_caught(tmp_path, monkeypatch):
    pages = _pages_module()
    copy = tmp_path / "docs" / "results"
    copy.mkdir(parents=True)
    for p in RESULTS.iterdir():
        copy.joinpath(p.name).write_text(p.read_text())
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    for p in (ROOT / "docs").glob("*.md"):  # pages outside results/ with generated blocks (budget.md)
        (tmp_path / "docs" / p.name).write_text(p.read_text())
    monkeypatch.setattr(pages, "RESULTS", copy)
    monkeypatch.setattr(pages, "ROOT", tmp_path)
    assert pages.main(["--check"]) == 0
    page = copy / "db3kd-fashion-mnist.md"
    best = re.search(r"\*\*\d+\.\d+\*\*", page.read_text()).group()  # the best student's accuracy, in bold
    page.write_text(page.read_text().replace(best, "**100.00**"))  # a number changed by hand
    assert pages.main(["--check"]) == 1
    assert pages.main([]) == 0 and best in page.read_text() and pages.main(["--check"]) == 0


@pytest.mark.parametrize("page", [*sorted(p.name for p in RESULTS.glob("*.md")), "../../README.md"])
def test_no_results_table_outside_a_generated_block(page):
    text = (RESULTS / page).read_text()
    outside = re.sub(r"<!-- generated:[\w-]+ -->.*?<!-- /generated -->", "", text, flags=re.S)
    rows = [line for line in outside.splitlines() if line.startswith("|") and re.search(r"\d\.\d", line)]
    assert not rows, f"{page}: table rows with numbers that no JSON generates: {rows[:3]}"


def test_each_page_json_names_the_command_that_wrote_it():
    for path in RESULTS.glob("*.json"):
        doc = json.loads(path.read_text())
        assert doc.get("command"), path.name


def test_levers_are_paired_with_the_recipe_seed_by_seed_on_the_same_thread_count():
    rec = lambda m, seed, acc, threads=1: {"dataset": "d", "budget": 100, "method": m, "seed": seed,  # noqa: E731
                                           "test_acc": acc, "threads": threads}
    doc = {"records": [rec("budgeted", 0, 70.0), rec("budgeted", 1, 74.0), rec("budgeted", 2, 60.0, threads=2),
                       rec("budgeted-x", 0, 71.0), rec("budgeted-x", 1, 73.0), rec("budgeted-x", 2, 90.0),
                       rec("random", 0, 50.0)]}
    rows = [line for line in _pages_module().paired_table(doc).splitlines() if line.startswith("| d ")]
    # seed 2 ran on another thread count: not a pair; random is not a lever of the recipe
    assert rows == ["| d | 100 | `budgeted-x` | `budgeted` | 2 | 72.00 ± 1.41 | 72.00 ± 2.83 | +0.00 ± 1.41 | 1 of 2 |"]


def test_an_ablation_of_recipe_v2_is_paired_with_v2_and_a_lever_of_v1_with_v1():
    """The settings key says which recipe a ``budgeted-<x>`` row changed: ``-mixup`` measured on v1
    pairs with ``budgeted`` (v1), ``-no-mixup`` measured on v2 with ``budgeted-combo``, and v2 itself
    (``budgeted-combo``) with v1."""
    from zsdb3kd.budget import V1, BudgetSettings

    v1, v2 = BudgetSettings(**V1), BudgetSettings()
    rec = lambda m, acc, settings: {"dataset": "d", "budget": 100, "method": m, "seed": 0,  # noqa: E731
                                    "test_acc": acc, "threads": 1, "settings_key": settings.key()}
    doc = {"records": [rec("budgeted", 70.0, v1), rec("budgeted-combo", 74.0, v2),
                       rec("budgeted-mixup", 71.0, v1.replace(mixup=0.5)),
                       rec("budgeted-no-mixup", 72.5, v2.replace(mixup=0.0))]}
    pages = _pages_module()
    assert pages.against(doc["records"][3], pages._ablations()) == "budgeted-combo"
    # recipe v1 run after v2 became the default pairs with v2 by its settings, whatever its name
    for name in ("budgeted-v1", "budgeted-recipe-one"):
        assert pages.against(rec(name, 69.0, v1), pages._ablations()) == "budgeted-combo"
    rows = [line for line in pages.paired_table(doc).splitlines() if line.startswith("| d ")]
    assert rows == ["| d | 100 | `budgeted-combo` | `budgeted` | 1 | 74.00 | 70.00 | +4.00 | 1 of 1 |",
                    "| d | 100 | `budgeted-mixup` | `budgeted` | 1 | 71.00 | 70.00 | +1.00 | 1 of 1 |",
                    "| d | 100 | `budgeted-no-mixup` | `budgeted-combo` | 1 | 72.50 | 74.00 | -1.50 | 0 of 1 |"]


def test_each_budget_table_says_which_recipe_its_budgeted_rows_ran():
    from zsdb3kd.budget import V1, BudgetSettings

    pages = _pages_module()
    rec = {"dataset": "fashion-mnist", "method": "budgeted", "budget": 10000, "seed": 0, "test_acc": 70.0,
           "fidelity": 72.0, "teacher_acc": 91.0, "wall_s": 100.0, "threads": 1}
    assert pages.recipe_of({"records": [rec]}) == "v1"  # records without a key predate v2
    assert pages.recipe_of({"records": [{**rec, "settings_key": BudgetSettings(**V1).key()}]}) == "v1"
    assert pages.recipe_of({"records": [{**rec, "settings_key": BudgetSettings().key()}]}) == "v2"
    assert pages.recipe_of({"records": [{**rec, "settings_key": "0123456789abcdef"}]}) == "another"
    assert pages.recipe_of({"records": [{**rec, "method": "random"}]}) == "none"
    block = pages.grid_block({"command": "cmd", "records": [{**rec, "settings_key": BudgetSettings().key()}]})
    assert "`budgeted` rows here: recipe v2" in block


def test_priors_pair_with_recipe_v2_and_show_every_ensemble_member():
    rec = lambda m, seed, acc, **kw: {"dataset": "d", "budget": 100, "method": m, "seed": seed,  # noqa: E731
                                      "test_acc": acc, "threads": 1, "command": f"cmd {m}", **kw}
    recipe = [rec("budgeted-combo", 0, 70.0), rec("budgeted-combo", 1, 74.0), rec("budgeted", 0, 10.0)]
    doc = {"records": [rec("stretch", 0, 71.5), rec("stretch", 2, 80.0),
                       rec("ensemble", 0, 75.0, members=[72.0, 74.0], fidelity=77.0, threads=2),
                       rec("kd", 0, 71.0, members=[72.0, 74.0], ensemble_acc=75.0, fidelity=73.0)]}
    text = _pages_module().priors_table(doc, recipe)
    assert "| `stretch` | d | 100 | 0 | 71.50 |  | 70.00 | +1.50 |" in text  # v2's seed 0, not v1's
    assert "| `stretch` | d | 100 | 2 | 80.00 |  |  |  |" in text  # no v2 run of seed 2: no pair
    assert "every seed: 72.00 ± 2.83 (2 seeds, 70.00 to 74.00)" in text
    assert "| `ensemble` | d | 100 | 2 | 72.00, 74.00 | 73.00 ± 1.41 | 75.00 |  | 77.00 |" in text
    assert "| `kd` | d | 100 | 2 | 72.00, 74.00 | 73.00 ± 1.41 | 75.00 | 71.00 | 73.00 |" in text
