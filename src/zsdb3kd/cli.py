"""The ``zsdb3kd`` command: a thin layer, one library call per subcommand.

``main(argv=None) -> int`` so tests call it directly. Flags are generated from the same
settings classes the library and the config files use (:mod:`zsdb3kd.cliargs`), so
defaults, types and help agree everywhere. Errors a user can act on (bad paths, shapes,
budgets, settings) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import Sequence

from .cliargs import SettingsFlags
from .budget import BudgetSettings
from .data import DataSettings
from .distill import TrainSettings
from .experiment.config import TeacherSection
from .oracle import TeacherSpec
from .robustness import RobustnessSettings
from .runtime import setup_logging, sigterm_interrupts
from .settings import Device, Settings
from .synthesis import SynthesisSettings

EXIT_USAGE = 2


class Common(Settings):
    """Run: device and seed."""

    device: Device = "cpu"
    seed: int = 0


Common.model_fields["device"].description = "cpu, cuda or cuda:N"
Common.model_fields["seed"].description = "random seed (samples, splits, searches, initial weights)"

TEACHER = SettingsFlags(TeacherSpec, rename={"path": "--teacher"}, required=["path"])
DATA = SettingsFlags(DataSettings, rename={"name": "--data", "root": "--data-root"})
COMMON = SettingsFlags(Common)
ROBUSTNESS = SettingsFlags(RobustnessSettings, exclude=["seed"])
SYNTHESIS = SettingsFlags(SynthesisSettings, exclude=["seed"])
TRAIN = SettingsFlags(TrainSettings)
BUDGET = SettingsFlags(BudgetSettings)
TEACHER_TRAIN = SettingsFlags(TeacherSection, only=["arch", "epochs", "batch_size", "lr", "weight_decay", "augment"],
                              title="Teacher training")


class _Parser(argparse.ArgumentParser):
    """One line for a usage error, like every other error of this command."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


class _Help(argparse.HelpFormatter):
    """Help lines wrapped at spaces only, so names such as hsja-sub-circle stay whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return _Help(prog, max_help_position=34, width=110)


def _add(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_formatter)


def _extra(p: argparse.ArgumentParser, *specs: tuple) -> None:
    """Command-specific flags that belong to no settings class: ``(flag, kwargs)``."""
    g = p.add_argument_group("command")
    for flag, kw in specs:
        if "default" in kw and kw["default"] is not None and "help" in kw:
            kw = {**kw, "help": f"{kw['help']} (default: {kw['default']})"}
        g.add_argument(flag, **kw)


_OUT = ("--out", {"required": True, "help": "file to write"})
_PLAN = ("--plan", {"action": "store_true", "help": "print the most teacher queries it can spend, then exit"})
_QB = ("--query-budget", {"type": int, "default": None, "help": "the most teacher queries this command may spend"})
_PROGRESS = ("--no-progress", {"action": "store_true", "help": "log lines instead of progress bars"})


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="zsdb3kd", description="Distil a label-only teacher into a student "
                                 "(DB3KD / ZSDB3KD, arXiv 2106.03310).", formatter_class=_formatter)
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    p = _add(sub, "run", "run or resume a whole experiment from a TOML config")
    p.add_argument("config", help="experiment file, e.g. configs/fashion-mnist/db3kd/quickstart.toml")
    _extra(p, ("--run-dir", {"default": None, "help": "where artifacts go (default runs/<name>)"}),
           ("--force", {"action": "store_true", "help": "accept a run directory that holds another configuration"}),
           _PLAN, _PROGRESS)

    p = _add(sub, "train-teacher", "train a registry model with cross-entropy on real labelled data")
    DATA.add(p), COMMON.add(p), TEACHER_TRAIN.add(p)
    _extra(p, _OUT, _PROGRESS)

    p = _add(sub, "robustness", "boundary distances of samples to every other class (soft labels)")
    TEACHER.add(p), DATA.add(p), COMMON.add(p), ROBUSTNESS.add(p)
    _extra(p, ("--split", {"default": "train", "choices": ["train", "test"], "help": "split of --data"}),
           ("--pseudo", {"default": None, "help": "zero-shot: the pseudo samples of this file instead of --data"}),
           ("--subset", {"type": int, "default": None, "help": "number of samples (deterministic under --seed)"}),
           _QB, _PLAN, ("--out", {"required": True, "help": "result file; <out>.parts/ keeps chunks for resuming"}),
           _PROGRESS)

    p = _add(sub, "synthesize", "zero-shot pseudo samples from noise (no real data)")
    TEACHER.add(p), COMMON.add(p), SYNTHESIS.add(p)
    _extra(p, _QB, _PLAN, ("--out", {"required": True, "help": "pseudo-sample file; <out>.parts/ keeps its state"}),
           _PROGRESS)

    p = _add(sub, "soft-labels", "export soft labels (logits and softmax) from a robustness file")
    p.add_argument("robustness", help="file written by 'zsdb3kd robustness'")
    _extra(p, ("--at-queries", {"type": int, "default": None, "help": "distances at this many queries per pair "
                                                                     "(default: the largest recorded)"}),
           ("--temperature", {"type": float, "default": 20.0, "help": "T of the exported softmax"}), _OUT)

    p = _add(sub, "distill", "train a student: ce, whitebox-kd, soft labels, or random images (zero-shot)")
    TEACHER.add(p), DATA.add(p), COMMON.add(p), TRAIN.add(p)
    _extra(p, ("--method", {"default": "soft", "choices": ["ce", "whitebox-kd", "soft", "random"],
                            "help": "random (zero-shot): random images labelled by the teacher, one query each"}),
           ("--student", {"default": "lenet5-half", "help": "student architecture (see list-models)"}),
           ("--robustness", {"default": None, "help": "method soft: a robustness file"}),
           ("--soft-labels", {"default": None, "help": "method soft: a file from 'soft-labels'"}),
           ("--at-queries", {"type": int, "default": None, "help": "method soft: distances at this many queries per "
                                                                  "pair (default: the largest recorded)"}),
           ("--subset", {"type": int, "default": None, "help": "methods ce, whitebox-kd: training images"}),
           ("--pseudo", {"default": None, "help": "zero-shot: train on this pseudo-sample file (methods soft, ce); "
                                                 "only the real test split is read"}),
           ("--val-fraction", {"type": float, "default": 0.1, "help": "zero-shot: held-out share of pseudo samples"}),
           ("--random-kind", {"default": "smooth", "choices": ["smooth", "paper", "mixed", "uniform"],
                              "help": "method random: the images"}),
           ("--random-samples", {"type": int, "default": 1_000_000, "help": "method random: images, held out ones "
                                                                          "included"}),
           ("--random-val", {"type": int, "default": 10_000, "help": "method random: held out for model selection"}),
           ("--labels-dir", {"default": None, "help": "method random: where the labels are kept (default "
                                                     "<out>.labels)"}),
           _QB, _PLAN, _OUT, _PROGRESS)

    p = _add(sub, "extract", "the best student for a total query budget (zero-shot, or a pool of your unlabelled "
                             "images)")
    TEACHER.add(p), DATA.add(p), COMMON.add(p), BUDGET.add(p)
    _extra(p, ("--budget", {"type": int, "required": True, "help": "total teacher queries (never exceeded)"}),
           ("--student", {"default": "lenet5-half", "help": "student architecture (see list-models)"}),
           ("--pool", {"default": "none", "choices": ["none", "train"], "help": "train: the training images of "
                       "--data are the candidates (their labels are never read); none: synthetic images only"}),
           ("--no-evaluate", {"action": "store_true", "help": "skip the test accuracy (no --data needed)"}),
           ("--work-dir", {"default": None, "help": "answered queries and per-round state, for resuming (default "
                                                   "<out>.work)"}), _QB, _PLAN, _OUT)

    p = _add(sub, "evaluate", "test accuracy of a weights file, ONNX model or label server URL")
    SettingsFlags(TeacherSpec, rename={"path": "model"}, exclude=["query_log"]).add(p)
    DATA.add(p)
    SettingsFlags(Common, only=["device"]).add(p)

    p = _add(sub, "serve", "serve a teacher as a label-only HTTP black box (for --teacher http://...)")
    SettingsFlags(TeacherSpec, rename={"path": "teacher"}, exclude=["query_log", "max_batch"]).add(p)
    SettingsFlags(Common, only=["device"]).add(p)
    _serve_flags().add(p)
    p.epilog = ("Set ZSDB3KD_SERVE_TOKEN to require 'Authorization: Bearer <token>' (clients: ZSDB3KD_HTTP_AUTH). "
                "Only labels leave the server.")

    p = _add(sub, "export-onnx", "export weights to ONNX (to serve or test as a black box)")
    p.add_argument("weights")
    _extra(p, _OUT)

    _add(sub, "list-models", "registered architectures")
    return ap


def _serve_flags() -> SettingsFlags:
    from .serve import ServeSettings

    return SettingsFlags(ServeSettings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2): a status, as for every other outcome
        return int(e.code or 0)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    setup_logging()
    from .data import DataError
    from .experiment.jobs import PlanOnly
    from .oracle import OracleError, QueryBudgetExceeded
    from .parallel import exit_rank, finish, init_from_env, is_main
    from .synthesis import SynthesisError
    from .weights import WeightsError

    restore = sigterm_interrupts() if args.command != "serve" else None  # serve stops on SIGTERM its own way
    ranks = False
    try:
        ranks = init_from_env(getattr(args, f"{Common.__name__}__device", "cpu"))
        with contextlib.nullcontext() if is_main() else contextlib.redirect_stdout(io.StringIO()):
            status = _COMMANDS[args.command](args)  # under torchrun only rank 0 reports
        finish()
        if ranks:
            exit_rank(status)
        return status
    except PlanOnly as e:
        finish()
        print(e)
        if ranks:
            exit_rank(0)
        return 0
    except (DataError, WeightsError, QueryBudgetExceeded, SynthesisError, FileNotFoundError, ValueError,
            OracleError, ImportError) as e:  # ConfigError is a ValueError
        print(f"zsdb3kd {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"zsdb3kd {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if restore is not None:
            restore()


def _progress(args) -> bool | None:
    return False if getattr(args, "no_progress", False) else None


def _cmd_run(args) -> int:
    from .experiment import format_plan, plan_experiment, run_experiment

    if args.plan:
        cfg, rows = plan_experiment(args.config)
        print(format_plan(cfg, rows))
        return 0
    report = run_experiment(args.config, args.run_dir, progress=_progress(args), force=args.force)
    for r in report["students"]:
        print(f"{r['method']:>14}  test {r['test_acc']:6.2f}%  queries {r.get('total_queries') or '-'}")
    return 0


def _cmd_train_teacher(args) -> int:
    from .experiment import train_teacher
    from .experiment.stages import check_buildable

    data, common, teacher = DATA.build(args), COMMON.build(args), TEACHER_TRAIN.build(args)
    splits = data.splits(common.seed)
    check_buildable(teacher.arch, splits.train.shape, len(splits.train.classes), "architecture")
    train = TrainSettings(**teacher.model_dump(include=set(TrainSettings.model_fields)))
    m = train_teacher(splits, teacher.arch, args.out, train, seed=common.seed, device=common.device,
                      progress=_progress(args))
    print(f"{teacher.arch}: val {m['val_acc']:.2f}%  test {m['test_acc']:.2f}%  -> {args.out}")
    return 0


def _cmd_robustness(args) -> int:
    import torch

    from .experiment.jobs import robustness_job, samples_for

    common = COMMON.build(args)
    settings = ROBUSTNESS.build(args, seed=common.seed)
    samples = samples_for(DATA.build(args), common.seed, args.split, args.subset, args.pseudo)
    res = robustness_job(TEACHER.build(args), settings, samples, args.out, device=common.device,
                         query_budget=args.query_budget, plan_only=args.plan, progress=_progress(args))
    d = res.at()
    finite = d[torch.isfinite(d)]
    median = f"median distance {finite.median():.4f}" if finite.numel() else "no boundary point found"
    print(f"{len(res.indices)} samples, {median} at {settings.queries_per_pair} queries/pair, "
          f"{res.total_queries:,} queries ({res.provenance['queries_this_session']:,} paid now), "
          f"{res.provenance['queries_per_s']:,.0f} q/s -> {args.out}")
    return 0


def _cmd_synthesize(args) -> int:
    from .experiment.jobs import synthesize_job

    common = COMMON.build(args)
    ps = synthesize_job(TEACHER.build(args), SYNTHESIS.build(args, seed=common.seed), args.out, device=common.device,
                        query_budget=args.query_budget, plan_only=args.plan, progress=_progress(args))
    curve = ", ".join(f"{v:.3f}" for v in ps.mean_distance.tolist())
    print(f"{len(ps.y)} pseudo samples, {ps.provenance['total_queries']:,} queries, mean boundary distance per "
          f"round: {curve} -> {args.out}")
    return 0


def _cmd_soft_labels(args) -> int:
    from .robustness import RobustnessResult
    from .softlabels import save_soft_labels

    res = RobustnessResult.load(args.robustness)
    budget = args.at_queries if args.at_queries is not None else int(res.checkpoints[-1])
    save_soft_labels(args.out, res.logits(budget), res.indices, res.teacher_labels, args.temperature,
                     {"source": str(args.robustness), "queries_per_pair": budget,
                      "split": res.provenance.get("split", "train")})
    print(f"{len(res.indices)} soft labels at {budget} queries/pair -> {args.out}")
    return 0


def _cmd_distill(args) -> int:
    from .experiment.jobs import distill_job, random_job

    common, teacher, data, train = COMMON.build(args), TEACHER.build(args), DATA.build(args), TRAIN.build(args)
    if args.method == "random":
        if args.pseudo or args.robustness or args.soft_labels:
            raise ValueError("--method random takes none of --pseudo, --robustness, --soft-labels")
        m = random_job(teacher, data, args.student, train, args.out, kind=args.random_kind,
                       samples=args.random_samples, val=args.random_val, seed=common.seed, labels_dir=args.labels_dir,
                       device=common.device, query_budget=args.query_budget, plan_only=args.plan,
                       progress=_progress(args))
        print(f"{args.student} (random {args.random_kind}, {m['train_images']:,} images, {m['new_queries']:,} new "
              f"teacher queries): val {m['val_acc']:.2f}% (held-out random images)  test {m['test_acc']:.2f}%  "
              f"-> {args.out}")
        return 0
    m = distill_job(teacher, args.method, data, args.student, train, args.out, seed=common.seed, subset=args.subset,
                    robustness=args.robustness, soft_labels=args.soft_labels, at_queries=args.at_queries,
                    pseudo=args.pseudo, val_fraction=args.val_fraction, device=common.device,
                    query_budget=args.query_budget, plan_only=args.plan, progress=_progress(args))
    kind = "zero-shot " if args.pseudo else ""
    print(f"{args.student} ({kind}{args.method}): val {m['val_acc']:.2f}%  test {m['test_acc']:.2f}%  -> {args.out}")
    return 0


def _cmd_extract(args) -> int:
    from .experiment.extract import extract_job

    common, teacher = COMMON.build(args), TEACHER.build(args)
    data = None if args.no_evaluate and args.pool == "none" else DATA.build(args)
    m = extract_job(teacher, args.student, args.budget, args.out, settings=BUDGET.build(args), data=data,
                    pool=args.pool == "train", evaluate=not args.no_evaluate, seed=common.seed, work_dir=args.work_dir, device=common.device,
                    query_budget=args.query_budget, plan_only=args.plan)
    test = f"  test {m['test_acc']:.2f}%" if "test_acc" in m else ""
    print(f"{args.student} (budgeted, recipe {m['settings']['recipe']}, {m['queries']:,} queries, "
          f"{m['paid_this_run']:,} paid now): held-out agreement "
          f"{m['agreement_held_out']:.2f}%{test}  -> {args.out}")
    return 0


def _cmd_evaluate(args) -> int:
    from .experiment.jobs import evaluate_job

    model = SettingsFlags(TeacherSpec, rename={"path": "model"}, exclude=["query_log"]).build(args)
    data = DATA.build(args)
    acc = evaluate_job(model, data, SettingsFlags(Common, only=["device"]).build(args).device)
    print(f"{model.path}: test accuracy {acc:.2f}% on the test split of {data.name}")
    return 0


def _cmd_serve(args) -> int:
    from .oracle import load_oracle, teacher_sha256
    from .serve import serve

    spec = SettingsFlags(TeacherSpec, rename={"path": "teacher"}, exclude=["query_log", "max_batch"]).build(args)
    settings = _serve_flags().build(args)
    device = SettingsFlags(Common, only=["device"]).build(args).device
    oracle = load_oracle(spec, device=device)  # quotas are the server's, per key (settings.max_queries)
    token = os.environ.get("ZSDB3KD_SERVE_TOKEN") or None
    quota = "no quota" if settings.max_queries is None else f"quota {settings.max_queries:,} queries per key"
    keys = "token required" if token or settings.keys else "no token"

    def ready(url: str) -> None:  # with --port 0 the port is known only once listening
        print(f"serving {spec.path} (labels only, {quota}, {keys}) at {url} ; Ctrl-C to stop", flush=True)

    n = serve(oracle, settings, model_sha256=teacher_sha256(spec, oracle), token=token, ready=ready)
    print(f"served {n:,} queries", flush=True)
    return 0


def _cmd_export_onnx(args) -> int:
    from .export import export_onnx

    print(f"-> {export_onnx(args.weights, args.out)}")
    return 0


def _cmd_list_models(args) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


_COMMANDS = {"run": _cmd_run, "train-teacher": _cmd_train_teacher, "robustness": _cmd_robustness,
             "synthesize": _cmd_synthesize, "soft-labels": _cmd_soft_labels, "distill": _cmd_distill,
             "extract": _cmd_extract, "evaluate": _cmd_evaluate, "serve": _cmd_serve,
             "export-onnx": _cmd_export_onnx, "list-models": _cmd_list_models}
