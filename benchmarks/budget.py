"""Student accuracy per teacher query: the budgeted student against the baselines and its ablations.

    python benchmarks/budget.py --datasets fashion-mnist mnist --budgets 5000 10000 20000 50000 200000 \
        --seeds 0 1 2 --methods random paper budgeted --out docs/results/budget.json

For every (dataset, method, budget, seed) cell it trains one student with at most ``budget``
teacher queries (no real training data, unless the method says ``pool``), then measures test
accuracy and fidelity (agreement with the teacher) on the test split, once. Cells already in
``--out`` are skipped, so the grid can be filled by several invocations (and rerun cheaply); a
budgeted cell keeps its state under ``--work-dir`` while it runs, so an interrupted one continues
where it stopped (its answers, its finished rounds, its training part way) when rerun;
``python scripts/results_pages.py`` turns the JSON into ``docs/results/budget.md``.

Methods:
* ``random``: today's ``distill --method random``: random low-frequency images labelled by the
  teacher, one query each, trained with cross-entropy (selection on 5% of them).
* ``paper``: the paper's zero-shot chain scaled to fit the budget (pseudo samples pushed from
  the teacher's boundaries, hard labels); only where it fits.
* ``budgeted``: the budgeted student with its default recipe; ``budgeted-<ablation>`` with one
  ingredient switched off (see ``ABLATIONS``); ``budgeted-off``: every ingredient off (one
  round of smooth random images, the engine's own ``random``).
* ``pool``: the budgeted student with the real unlabelled training images as its candidates
  (the DB3KD setting; labels are never read); ``pool-no-active``: chosen at random.
* ``pool-other``: the same with another dataset's training images of the same shape as the
  pool (MNIST digits for the Fashion-MNIST teacher and the other way round): what a user
  with unlabelled images from another domain can expect.
* ``all-labels`` (reference): the student trained on every training image labelled by the
  teacher (60,000 queries for the MNIST family); ``whitebox-kd``: on the teacher's logits.

Teachers are trained once per dataset (``--teacher-dir``), as ``zsdb3kd train-teacher`` does.
Every record names its teacher (test accuracy and the SHA-256 of the weights file): cells
measured with another teacher are not comparable, so a run whose teacher differs from the
one ``--out`` already holds for that dataset stops before its first cell (write to another
``--out``, or point ``--teacher-dir`` at the teacher of those records).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from filelock import FileLock

from zsdb3kd.budget import V1, BudgetSettings
from zsdb3kd.data import DataSettings
from zsdb3kd.distill import TrainSettings, accuracy, predict, train
from zsdb3kd.experiment.stages import train_teacher
from zsdb3kd.models import create_model
from zsdb3kd.oracle import TorchOracle
from zsdb3kd.store import write_json

DATASETS = {  # name -> (data settings, teacher arch, teacher epochs, student arch)
    "fashion-mnist": (DataSettings(name="fashion-mnist"), "lenet5", 20, "lenet5-half"),
    "mnist": (DataSettings(name="mnist", root=str(Path(__file__).resolve().parents[2] / "shared/data/mnist")),
              "lenet5", 20, "lenet5-half"),
    "cifar10": (DataSettings(name="cifar10", root=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpg")),
                "alexnet", 12, "alexnet-half"),
}

#: ``pool-other``: whose unlabelled training images make the pool for a dataset's teacher
OTHER_POOL = {"fashion-mnist": "mnist", "mnist": "fashion-mnist"}


#: what every budgeted method changes: recipe v2 by name on every dataset (the library's default,
#: ``recipe = "auto"``, runs v1 on colour images: that is ``budgeted-v1`` here)
BASE = BudgetSettings(recipe="v2")

#: one ingredient off each (keys of zsdb3kd.budget.BudgetSettings)
ABLATIONS = {
    "": {},
    "-no-active": {"acquisition": "random"},
    "-no-mutate": {"mutate_fraction": 0.0},
    "-blobs": {"candidates": {"smooth": 1.0}, "deform_p": 0.0, "cutmix_p": 0.0},
    "-no-balance": {"class_balance": False, "balanced_sampling": False},
    "-no-aug": {"augment_labelled": 0.0},
    "-one-round": {"rounds": 0},
    "-off": None,  # every ingredient off, same training steps: zsdb3kd.experiment.extract.recipe("random")
    "-v1": {"recipe": "v1"},  # the first recipe, the defaults until 2026-12-04
    # recipe v2's own levers, one off each (the ablations of the defaults since 2026-12-04)
    "-no-mixup": {"mixup": 0.0},
    "-no-curves": {"candidates": V1["candidates"]},
    "-no-fresh": {"final_fresh": False},  # the final 120 epochs continue the round-trained student
    "-no-wd": {"weight_decay": 0.0},
    # levers against v2: more of the candidates are variations of labelled images
    "-mutate75": {"mutate_fraction": 0.75},
    "-mutate90": {"mutate_fraction": 0.9},
    # ... half of the varied images drawn among those the current student gets wrong (all of them)
    "-mutate-errors": {"mutate_errors": 0.5},
    "-mutate-errors-all": {"mutate_errors": 1.0},
    # ... every varied image crossed (cut-mix / mixup) with a labelled image of its parent's class (half of them)
    "-same-class": {"mutate_same_class": 1.0},
    "-same-class50": {"mutate_same_class": 0.5},
    # levers (not ablations): one change each against the defaults (v1 when they were measured)
    "-mixup": {"mixup": 0.5},
    "-dip-mix": {"candidates": {"objects": 2.0, "noise": 1.0, "strokes": 1.0, "shapes": 1.0, "dip": 2.0}},
    "-dip": {"candidates": {"dip": 1.0}},
    "-pool32": {"pool_factor": 32.0},
    "-rounds16": {"rounds": 16},
    "-final120": {"final_epochs": 120.0},
    "-entropy": {"acquisition": "entropy"},
    "-fresh": {"final_fresh": True},
    "-fresh120": {"final_fresh": True, "final_epochs": 120.0},
    "-wd": {"weight_decay": 5e-4},
    "-ls": {"label_smoothing": 0.1},
    "-confident": {"acquisition": "confident"},
    "-committee": {"acquisition": "committee"},
    "-rare": {"rare_boost": 1.0},
    "-curves-mixup": {"candidates": {"objects": 2.0, "noise": 1.0, "strokes": 1.0, "shapes": 1.0, "curves": 2.0},
                      "mixup": 0.5},
    "-curves": {"candidates": {"objects": 2.0, "noise": 1.0, "strokes": 1.0, "shapes": 1.0, "curves": 2.0}},
    # every lever that measured ahead of the first recipe on average, together: the defaults since
    # 2026-12-04 (so the same settings as "", and the same settings_key as its records of before)
    "-combo": {"candidates": {"objects": 2.0, "noise": 1.0, "strokes": 1.0, "shapes": 1.0, "curves": 2.0},
               "mixup": 0.5, "weight_decay": 5e-4, "final_fresh": True, "final_epochs": 120.0},
}


def parse(method: str) -> tuple[str, dict]:
    """``(kind, overrides)`` of a method name."""
    from zsdb3kd.experiment.extract import recipe

    for kind in ("budgeted", "pool"):
        if method.startswith(kind) and method[len(kind):] in ABLATIONS:
            extra = ABLATIONS[method[len(kind):]]
            return kind, extra if extra is not None else recipe("random", BASE).model_dump()
    if method.startswith("pool-other") and method[len("pool-other"):] in ABLATIONS:
        return "pool-other", ABLATIONS[method[len("pool-other"):]] or {}
    if method in ("random", "paper", "all-labels", "whitebox-kd"):
        return method, {}
    raise SystemExit(f"unknown method {method!r}")


def teacher_for(name: str, teacher_dir: Path) -> Path:
    data, arch, epochs, _ = DATASETS[name]
    path = teacher_dir / f"{name}-{arch}.safetensors"
    if not path.exists():
        from zsdb3kd.experiment.config import TeacherSection

        t = TeacherSection(arch=arch, epochs=epochs, augment="flip-crop" if name == "cifar10" else "none")
        cfg = TrainSettings(**t.model_dump(include=set(TrainSettings.model_fields)))
        print(f"training the {name} teacher ({arch}, {epochs} epochs) -> {path}", flush=True)
        m = train_teacher(data.splits(0), arch, path, cfg, seed=0, progress=False)
        print(f"teacher test accuracy {m['test_acc']:.2f}%", flush=True)
    return path


def teacher_identity(path: Path, test_acc: float) -> dict:
    """What a record says of its teacher: its test accuracy and the SHA-256 of its weights file."""
    return {"teacher_acc": round(test_acc, 2), "teacher_sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def other_teacher(doc: dict, dataset: str, ident: dict) -> dict | None:
    """A record of ``doc`` for ``dataset`` measured with another teacher than ``ident`` (older
    records without a digest are told apart by the teacher's test accuracy), else ``None``."""
    for r in doc["records"]:
        if r["dataset"] != dataset:
            continue
        sha = r.get("teacher_sha256")
        if (sha is not None and sha != ident["teacher_sha256"]) or r.get("teacher_acc") != ident["teacher_acc"]:
            return r
    return None


def refuse_other_teacher(doc: dict, dataset: str, ident: dict, out: Path) -> None:
    """Stop, before any cell is trained, when ``out`` holds ``dataset`` records of another teacher."""
    r = other_teacher(doc, dataset, ident)
    if r is not None:
        raise SystemExit(f"{out} holds {dataset} records measured with another teacher (test accuracy "
                         f"{r.get('teacher_acc')}%, this one {ident['teacher_acc']}%): their numbers are not "
                         "comparable with new cells. Write to another --out file, or use the teacher of those "
                         "records (--teacher-dir).")


def run_random(oracle, student: str, budget: int, seed: int):
    from zsdb3kd.synthesis import label_random_images

    x, y = label_random_images(oracle, "smooth", budget, seed, progress=False)
    n_val = max(1, budget // 20)
    torch.manual_seed(seed)
    model = create_model(student, num_classes=oracle.num_classes, input_shape=oracle.input_shape)
    epochs = max(5, min(200, 2_000_000 // budget))  # about the same number of steps at every budget
    train(model, x[n_val:], y[n_val:], x[:n_val], y[:n_val], TrainSettings(epochs=epochs, batch_size=128), seed=seed,
          progress=False)
    return model


def run_paper(oracle, student: str, budget: int, seed: int):
    """The zero-shot chain at the largest size whose planned queries fit ``budget``."""
    from zsdb3kd.data import train_val_split
    from zsdb3kd.synthesis import SynthesisSettings, synthesize

    K = oracle.num_classes
    fitting = [s for s in (SynthesisSettings(per_class=pc, iterations=it, queries_per_search=q, search_k=10,
                                             noise_queries=budget // 2, noise="smooth", seed=seed,
                                             snapshots=())
                           for pc, it, q in ((400, 4, 40), (200, 3, 30), (100, 2, 30), (50, 2, 20), (20, 1, 20)))
               if s.max_queries(K) <= budget]
    if not fitting:
        return None
    ps = synthesize(oracle, fitting[0], progress=False)
    tr, va = train_val_split(ps.y, 0.1, seed)
    torch.manual_seed(seed)
    model = create_model(student, num_classes=K, input_shape=oracle.input_shape)
    train(model, ps.x[tr], ps.y[tr], ps.x[va], ps.y[va], TrainSettings(epochs=200), seed=seed, progress=False)
    return model


def run_budgeted(oracle, student: str, budget: int, seed: int, overrides: dict, pool: torch.Tensor | None,
                 device: str = "cpu", work_dir: Path | None = None, name: str = ""):
    from zsdb3kd.budget import train_budgeted

    t0 = time.perf_counter()

    def progress(entry: dict, rounds: int) -> None:
        print(f"{name}: round {entry['round'] + 1}/{rounds}, {entry['total_queries']:,} queries, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    res = train_budgeted(oracle, student, budget, BASE.replace(**overrides), seed=seed, pool=pool,
                         device=device, work_dir=work_dir, progress=progress if name else None)
    return res.student.cpu(), res.queries  # the whole run's queries, a resumed part included


def cell_dir(root: str, key: tuple, recipe_key: str | None, ident: dict, device: str) -> Path | None:
    """Where a budgeted cell keeps its resumable state (answers, students, training part way):
    named by the cell, its recipe, its teacher, device and threads, so an interrupted benchmark
    continues each cell where it stopped and never continues another's. ``None``: keep nothing."""
    if not root:
        return None
    dataset, method, budget, seed = key
    return Path(root) / (f"{dataset}-{method}-{budget}-s{seed}-{(recipe_key or '')[:12]}-"
                         f"{ident['teacher_sha256'][:12]}-{device}-t{torch.get_num_threads()}")


def run_reference(kind: str, data: DataSettings, teacher: Path, student: str, seed: int):
    from zsdb3kd.oracle import teacher_logits

    splits = data.splits(seed)
    oracle = TorchOracle.from_file(teacher)
    y = oracle(splits.train.x)
    tl = teacher_logits(str(teacher), splits.train.x) if kind == "whitebox-kd" else None
    torch.manual_seed(seed)
    model = create_model(student, num_classes=oracle.num_classes, input_shape=oracle.input_shape)
    train(model, splits.train.x, y, splits.val.x, oracle(splits.val.x), TrainSettings(epochs=40, batch_size=128),
          seed=seed, teacher_logits=tl, progress=False)
    return model, oracle.queries


def settings_key(kind: str, overrides: dict) -> str | None:
    """What names a budgeted method's recipe: the content hash of its full settings (the
    defaults of this checkout with the method's overrides), so a record says which recipe a
    name meant when it was measured; ``None`` for the other kinds."""
    if kind not in ("budgeted", "pool", "pool-other"):
        return None
    return BASE.replace(**overrides).key()


def refuse_other_recipe(doc: dict, rec: dict, out: Path) -> None:
    """Stop when ``doc`` holds records of ``rec``'s dataset and method measured with other
    settings (a changed default changes what a method name means; records without a key are
    older than the keys and are not compared)."""
    key = rec.get("settings_key")
    for r in doc["records"]:
        if (r["dataset"], r["method"]) == (rec["dataset"], rec["method"]) and None not in (key, r.get("settings_key")) \
                and r["settings_key"] != key:
            raise SystemExit(f"{out} holds {rec['dataset']} {rec['method']} records measured with other settings "
                             f"({r['settings_key']}, now {key}): the defaults changed since. Write to another "
                             "--out file.")


def save_cell(out: Path, rec: dict, command: str) -> dict:
    """Add one cell to ``out`` under a file lock, re-reading it first: several invocations may
    fill the same grid at once without losing each other's cells. A cell of another teacher
    than the file's records for its dataset, or of another recipe than the file's records of
    its method, is refused (``SystemExit``)."""
    with FileLock(f"{out}.lock"):
        doc = json.loads(out.read_text()) if out.exists() else {"command": "", "records": []}
        refuse_other_teacher(doc, rec["dataset"], {k: rec.get(k) for k in ("teacher_acc", "teacher_sha256")}, out)
        refuse_other_recipe(doc, rec, out)
        key = (rec["dataset"], rec["method"], rec["budget"], rec["seed"])
        doc["records"] = [r for r in doc["records"] if (r["dataset"], r["method"], r["budget"], r["seed"]) != key]
        doc["records"].append(rec)
        doc["command"] = command
        write_json(out, doc)
    return doc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["fashion-mnist"], choices=sorted(DATASETS))
    ap.add_argument("--budgets", nargs="+", type=int, default=[5000, 10000, 20000, 50000, 200000])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["random", "paper", "budgeted"])
    ap.add_argument("--teacher-dir", default="runs/bench-teachers")
    ap.add_argument("--out", default="docs/results/budget.json")
    ap.add_argument("--device", default="cpu", help="where the teacher answers and the budgeted students train "
                    "(the other methods stay on the CPU); records of another device say so")
    ap.add_argument("--work-dir", default="runs/bench-work",
                    help="where budgeted cells keep their state while they run, so an interrupted benchmark "
                         "resumes each cell part way (removed when the cell is saved; '' keeps nothing)")
    ap.add_argument("--data-root", nargs="*", default=[], metavar="NAME=DIR",
                    help="where a dataset's files are, e.g. fashion-mnist=/data/fmnist (default: the usual places)")
    args = ap.parse_args()
    for item in args.data_root:
        name, _, root = item.partition("=")
        if name not in DATASETS or not root:
            raise SystemExit(f"--data-root wants NAME=DIR with NAME one of {', '.join(sorted(DATASETS))}, got {item!r}")
        DATASETS[name] = (DATASETS[name][0].replace(root=root), *DATASETS[name][1:])
    on_gpu = args.device != "cpu"
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"command": "", "records": []}
    done = {(r["dataset"], r["method"], r["budget"], r["seed"]) for r in doc["records"]}
    doc["command"] = "python benchmarks/budget.py " + " ".join(sys.argv[1:])
    for name in args.datasets:
        data, _, _, student = DATASETS[name]
        teacher = teacher_for(name, Path(args.teacher_dir))
        test = data.load("test")
        t_pred = TorchOracle.from_file(teacher)(test.x)
        ident = teacher_identity(teacher, float((t_pred == test.y).float().mean() * 100))
        refuse_other_teacher(doc, name, ident, out)
        pool = None
        for method in args.methods:
            kind, overrides = parse(method)
            recipe_key = settings_key(kind, overrides)
            if recipe_key is not None:  # before the first cell, not after hours of them
                refuse_other_recipe(doc, {"dataset": name, "method": method, "settings_key": recipe_key}, out)
            if kind == "pool-other" and name not in OTHER_POOL:
                print(f"{name} {method}: no other dataset of its shape here, skipped", flush=True)
                continue
            budgets = [None] if kind in ("all-labels", "whitebox-kd") else args.budgets
            for budget in budgets:
                for seed in args.seeds:
                    key = (name, method, budget, seed)
                    if key in done:
                        continue
                    oracle = TorchOracle.from_file(teacher, budget=budget,
                                                   device=args.device if kind in ("budgeted", "pool") else "cpu")
                    t0, work, resumed = time.perf_counter(), None, False
                    if kind in ("all-labels", "whitebox-kd"):
                        model, spent = run_reference(kind, data, teacher, student, seed)
                    elif kind == "random":
                        model = run_random(oracle, student, budget, seed)
                    elif kind == "paper":
                        model = run_paper(oracle, student, budget, seed)
                    elif kind in ("budgeted", "pool", "pool-other"):
                        images, device = None, args.device
                        if kind == "pool":
                            if pool is None:
                                pool = data.load("train").x  # images only: their labels are never read
                            images = pool
                        elif kind == "pool-other":
                            images = DATASETS[OTHER_POOL[name]][0].load("train").x  # another domain, labels never read
                            device = "cpu"
                        work = cell_dir(args.work_dir, key, recipe_key, ident, device)
                        resumed = work is not None and (work / "state.json").exists()
                        model, spent = run_budgeted(oracle, student, budget, seed, overrides, images, device, work,
                                                    f"{name} {method}@{budget} seed {seed}")
                    if model is None:
                        print(f"{name} {method} {budget}: does not fit the budget, skipped", flush=True)
                        continue
                    if kind in ("random", "paper"):
                        spent = oracle.queries
                    pred = predict(model, test.x).argmax(1)
                    rec = {"dataset": name, "method": method, "budget": budget, "seed": seed, "queries": spent,
                           "test_acc": round(accuracy(model, test.x, test.y), 2),
                           "fidelity": round(float((pred == t_pred).float().mean() * 100), 2),
                           **ident, **({"settings_key": recipe_key} if recipe_key else {}),
                           "wall_s": round(time.perf_counter() - t0, 1),  # this process's part
                           **({"resumed": True} if resumed else {}),
                           "threads": torch.get_num_threads(), "command": doc["command"],
                           "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                           **({"device": args.device} if on_gpu and kind in ("budgeted", "pool") else {})}
                    assert budget is None or spent <= budget, rec
                    print(json.dumps(rec), flush=True)
                    doc = save_cell(out, rec, doc["command"])  # an interrupted benchmark keeps what it measured
                    if work is not None:
                        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
