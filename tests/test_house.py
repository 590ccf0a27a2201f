"""The house rules a newcomer relies on: small modules without import cycles, one set of
defaults for the library, the config files and the command line, help for every command,
and files written with the user's umask."""

from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest
import torch

from zsdb3kd import cli
from zsdb3kd.cli import main
from zsdb3kd.distill import TrainSettings
from zsdb3kd.experiment import RunConfig
from zsdb3kd.experiment.plan import robustness_settings, synthesis_settings
from zsdb3kd.robustness import RobustnessSettings
from zsdb3kd.synthesis import SynthesisSettings

PKG = Path(__file__).resolve().parents[1] / "src" / "zsdb3kd"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package-internal modules imported at module level (imports inside functions are lazy)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                stem = base[: len(base) - node.level + 1]
                target = ".".join(stem + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def test_no_module_is_much_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # a package importing its own submodules is how packages re-export; only other cycles count
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n] if n in stack else [m, n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_cli_and_config_share_their_defaults():
    """One definition per setting: an unset flag and an unset key give the same value."""
    cfg = RunConfig()
    parser = cli.build_parser()
    args = parser.parse_args(["robustness", "--teacher", "T", "--out", "R"])
    assert cli.ROBUSTNESS.build(args, seed=0) == RobustnessSettings() == robustness_settings(cfg, "hybrid")
    assert cli.DATA.build(args) == type(cfg.data).__mro__[1]()  # DataSettings, the [data] section's base
    args = parser.parse_args(["synthesize", "--teacher", "T", "--out", "P"])
    assert cli.SYNTHESIS.build(args, seed=0) == SynthesisSettings() == synthesis_settings(cfg)
    args = parser.parse_args(["distill", "--teacher", "T", "--out", "S"])
    student = TrainSettings(**cfg.student.model_dump(include=set(TrainSettings.model_fields)))
    assert cli.TRAIN.build(args) == TrainSettings() == student
    args = parser.parse_args(["train-teacher", "--out", "T"])
    teacher = cli.TEACHER_TRAIN.build(args)
    assert (teacher.arch, teacher.epochs, teacher.batch_size) == (cfg.teacher.arch, cfg.teacher.epochs,
                                                                  cfg.teacher.batch_size)


@pytest.mark.parametrize("command", sorted(cli._COMMANDS))
def test_every_command_has_help_with_defaults(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: zsdb3kd " + command)
    if command not in ("list-models", "export-onnx", "soft-labels", "run"):
        assert "(default:" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [["evaluate", "T.safetensors", "--device", "cuda"],
                                  ["robustness", "--teacher", "T", "--out", "R", "--device", "cuda:1"]])
def test_cuda_without_cuda_is_one_line_and_status_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device: CUDA is not available here" in err and "Traceback" not in err


def test_outputs_get_the_users_umask(tmp_path):
    from zsdb3kd.models import create_model
    from zsdb3kd.store import save_tagged, write_json
    from zsdb3kd.weights import save_weights

    old = os.umask(0o022)
    try:
        w = save_weights(create_model("mlp", input_shape=(1, 2, 2)), tmp_path / "w.safetensors", arch="mlp",
                         input_shape=(1, 2, 2), num_classes=10)
        t = save_tagged(tmp_path / "t.safetensors", {"a": torch.zeros(2)}, "x")
        j = write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    for f in (w, t, j):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
