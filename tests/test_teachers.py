"""Teachers as users have them: a scikit-learn model exported by skl2onnx with its default
options (flat input, label-first outputs, pixels 0..16), and a plain PyTorch state dict,
each usable from the command line with flags alone; and what needs a flag says which."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from zsdb3kd.cli import main

sklearn = pytest.importorskip("sklearn")
skl2onnx = pytest.importorskip("skl2onnx")
pytest.importorskip("onnxruntime")

DIGITS_FLAGS = ["--input-shape", "1,8,8", "--num-classes", "10", "--input-scale", "16"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """An MLP on scikit-learn's 8x8 digits (pixels 0..16), exported with skl2onnx's defaults, and
    the digits as an npz directory (uint8, 0..16)."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from skl2onnx import to_onnx

    d = tmp_path_factory.mktemp("digits")
    data = load_digits()
    x, y = data.images.astype(np.uint8), data.target
    np.savez(d / "train.npz", x=x[:1400], y=y[:1400])
    np.savez(d / "test.npz", x=x[1400:], y=y[1400:])
    flat = data.data.astype(np.float32)
    model = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0).fit(flat[:1400], y[:1400])
    (d / "digits.onnx").write_bytes(to_onnx(model, flat[:1]).SerializeToString())
    probs = to_onnx(model, flat[:1], options={id(model): {"zipmap": False}})
    (d / "digits-probs.onnx").write_bytes(probs.SerializeToString())
    return d, float(model.score(flat[1400:], y[1400:]) * 100)


def _data(d: Path) -> list[str]:
    return ["--data", "npz", "--data-root", str(d), "--pixel-scale", "16", "--val-size", "100"]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_digits_default_export_needs_its_image_shape_and_says_so(digits, capsys):
    d, _ = digits
    assert main(["evaluate", str(d / "digits.onnx"), *_data(d)]) == 2
    assert "has shape (N, 64), not (N, C, H, W); declare the image shape with --input-shape C,H,W (e.g. 1,8,8" \
        in _err(capsys)
    assert main(["evaluate", str(d / "digits.onnx"), *_data(d), "--input-shape", "1,8,8"]) == 2
    assert "labels only; declare --num-classes" in _err(capsys)
    assert main(["evaluate", str(d / "digits.onnx"), "--data", "npz", "--data-root", str(d), *DIGITS_FLAGS]) == 2
    assert "--pixel-scale 16" in _err(capsys)  # 0..16 data is not silently divided by 255


def test_digits_teacher_from_the_cli_with_flags_alone(digits, tmp_path, capsys):
    d, sk_acc = digits
    onnx = str(d / "digits.onnx")
    assert main(["evaluate", onnx, *_data(d), *DIGITS_FLAGS]) == 0
    acc = float(re.search(r"test accuracy ([0-9.]+)%", capsys.readouterr().out).group(1))
    assert acc == pytest.approx(sk_acc, abs=0.01)  # exactly scikit-learn's own score
    rob = tmp_path / "R.safetensors"
    assert main(["robustness", "--teacher", onnx, *DIGITS_FLAGS, *_data(d), "--subset", "12", "--method",
                 "hsja-sub-circle", "--queries-per-pair", "60", "--checkpoints", "30,60", "--out", str(rob),
                 "--no-progress"]) == 0, capsys.readouterr().err
    from zsdb3kd.robustness import RobustnessResult

    res = RobustnessResult.load(rob)
    assert res.distances.shape == (12, 10, 2) and torch.isfinite(res.at(60)[~torch.isnan(res.at(60))]).float().mean() > 0.5
    for method, extra, student, floor in (("soft", ["--robustness", str(rob)], "mlp", 12.0),
                                          ("ce", ["--subset", "300"], "mlp", 30.0),
                                          ("random", ["--random-samples", "3000", "--random-val", "300"], "cnn-small",
                                           30.0)):
        out = tmp_path / f"{method}.safetensors"
        rc = main(["distill", "--teacher", onnx, *DIGITS_FLAGS, *_data(d), "--method", method, *extra, "--student",
                   student, "--epochs", "6", "--lr", "0.01", "--batch-size", "64", "--out", str(out), "--no-progress"])
        assert rc == 0, capsys.readouterr().err
        assert float(re.search(r"test ([0-9.]+)%", capsys.readouterr().out).group(1)) > floor  # chance is 10%


def test_digits_student_that_cannot_take_8x8_fails_before_any_query(digits, tmp_path, capsys):
    d, _ = digits
    out = tmp_path / "r.safetensors"
    rc = main(["distill", "--teacher", str(d / "digits.onnx"), *DIGITS_FLAGS, *_data(d), "--method", "random",
               "--random-samples", "2000", "--random-val", "200", "--student", "lenet5-half", "--out", str(out)])
    assert rc == 2 and "'lenet5-half' cannot take (1, 8, 8) images" in _err(capsys)
    assert not Path(f"{out}.labels").exists()  # no label was paid for


def test_whitebox_kd_reads_probabilities_as_log_probabilities(digits, tmp_path, capsys):
    from zsdb3kd.oracle import OnnxOracle, TeacherSpec, teacher_logits

    d, _ = digits
    base = ["distill", *_data(d), "--method", "whitebox-kd", "--subset", "200", "--student", "mlp", "--epochs", "1"]
    rc = main([*base, "--teacher", str(d / "digits.onnx"), *DIGITS_FLAGS, "--out", str(tmp_path / "a.safetensors")])
    assert rc == 2 and "labels only; white-box KD needs a scores output (choose one with --output NAME)" in _err(capsys)
    probs = d / "digits-probs.onnx"
    rc = main([*base, "--teacher", str(probs), *DIGITS_FLAGS, "--output", "probabilities",
               "--out", str(tmp_path / "b.safetensors")])
    assert rc == 0, capsys.readouterr().err
    x = torch.rand(5, 1, 8, 8)
    z = teacher_logits(TeacherSpec(path=str(probs), input_shape=(1, 8, 8), output="probabilities", input_scale=16), x)
    oracle = OnnxOracle(probs, input_shape=(1, 8, 8), output="probabilities", input_scale=16)
    p = oracle._run(x)
    assert oracle.scores(x).exp().allclose(p, atol=1e-6) and oracle.detected_scores == "probabilities"
    assert z.shape == (5, 10)


# ---------------------------------------------------------------------------------------
# a plain state dict on every command that takes a teacher
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def state_dict_teacher(tmp_path_factory):
    from conftest import fmnist_npz

    from zsdb3kd.models import create_model

    d = fmnist_npz(tmp_path_factory.mktemp("fm"), 600, 200)
    torch.manual_seed(0)
    pt = d / "teacher.pt"
    torch.save(create_model("lenet5-fifth").state_dict(), pt)
    return d, pt


PT_FLAGS = ["--arch", "lenet5-fifth", "--input-shape", "1,28,28", "--num-classes", "10"]


def test_a_state_dict_teacher_needs_its_architecture_and_says_which_flags(state_dict_teacher, capsys):
    d, pt = state_dict_teacher
    assert main(["evaluate", str(pt), "--data", "npz", "--data-root", str(d)]) == 2
    err = _err(capsys)
    assert "pass --arch, --input-shape, --num-classes" in err


@pytest.mark.parametrize("argv", [
    ["evaluate", "{pt}", *PT_FLAGS],
    ["robustness", "--teacher", "{pt}", *PT_FLAGS, "--subset", "2", "--method", "bd", "--queries-per-pair", "10",
     "--out", "{tmp}/R.safetensors"],
    ["distill", "--teacher", "{pt}", *PT_FLAGS, "--method", "ce", "--subset", "50", "--epochs", "1",
     "--out", "{tmp}/S.safetensors"],
    ["distill", "--teacher", "{pt}", *PT_FLAGS, "--method", "whitebox-kd", "--subset", "50", "--epochs", "1",
     "--out", "{tmp}/S.safetensors"],
    ["distill", "--teacher", "{pt}", *PT_FLAGS, "--method", "random", "--random-samples", "200", "--random-val", "50",
     "--epochs", "1", "--out", "{tmp}/S.safetensors"],
    ["synthesize", "--teacher", "{pt}", *PT_FLAGS, "--per-class", "1", "--iterations", "0", "--plan",
     "--out", "{tmp}/P.safetensors"],
])
def test_a_state_dict_teacher_works_on_every_command(state_dict_teacher, tmp_path, capsys, argv):
    d, pt = state_dict_teacher
    argv = [a.format(pt=pt, tmp=tmp_path) for a in argv]
    data = ["--data", "npz", "--data-root", str(d), "--val-size", "100"] if argv[0] != "synthesize" else []
    rc = main([*argv, *data, "--no-progress"] if argv[0] not in ("evaluate", "synthesize") else [*argv, *data])
    assert rc == 0, capsys.readouterr().err
