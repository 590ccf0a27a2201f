"""The ``zsdb3kd`` command, called through ``main(argv)`` on a small Fashion-MNIST npz copy."""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import fmnist_npz
import torch
from safetensors.torch import load_file

from zsdb3kd.cli import main
from zsdb3kd.data import DEFAULT_ROOTS, load_dataset

FMNIST = Path(DEFAULT_ROOTS["fashion-mnist"])
if not FMNIST.is_dir():
    pytest.skip(f"Fashion-MNIST not installed at {FMNIST}", allow_module_level=True)

N_TRAIN, N_TEST, VAL = 3000, 1000, 500




def _run(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout/stderr captured (for module-scoped fixtures, where capsys is unavailable)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return fmnist_npz(tmp_path_factory.mktemp("fmnist-npz"), N_TRAIN, N_TEST)


def _data(d: Path) -> list[str]:
    return ["--data", "npz", "--data-root", str(d), "--val-size", str(VAL)]


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "T.safetensors"
    rc, out, err = _run(["train-teacher", *_data(data_dir), "--arch", "lenet5-fifth", "--epochs", "2", "--lr", "1e-2",
                         "--out", path, "--no-progress"])
    return rc, path, out, err


@pytest.fixture(scope="module")
def rob(data_dir, teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("rob") / "R.safetensors"
    rc, out, err = _run(["robustness", "--teacher", teacher[1], *_data(data_dir), "--subset", "8", "--method", "mbd",
                         "--queries-per-pair", "300", "--checkpoints", "100,300", "--chunk-size", "4", "--out", path,
                         "--no-progress"])
    return rc, path, out, err


def _accuracy_printed(text: str) -> float:
    m = re.search(r"test accuracy ([0-9.]+)%", text)
    assert m, text
    return float(m.group(1))


# ---------------------------------------------------------------------------------------
# the commands
# ---------------------------------------------------------------------------------------


def test_train_teacher(teacher, data_dir, capsys):
    rc, path, out, err = teacher
    assert rc == 0, err
    assert path.is_file()
    assert "lenet5-fifth" in out and str(path) in out
    from zsdb3kd.weights import read_weights_info

    info = read_weights_info(path)
    assert info.arch == "lenet5-fifth" and info.num_classes == 10 and info.input_shape == (1, 28, 28)

    assert main(["evaluate", str(path), "--data", "npz", "--data-root", str(data_dir)]) == 0
    acc = _accuracy_printed(capsys.readouterr().out)
    assert acc > 40.0  # chance is 10%
    # the printed number is the real accuracy of the file on the test split
    from zsdb3kd.oracle import load_oracle

    test = load_dataset("npz", data_dir, "test")
    assert len(test) == N_TEST
    real = float((load_oracle(path)(test.x) == test.y).float().mean() * 100)
    assert acc == pytest.approx(real, abs=0.006)


def test_robustness(rob, teacher, data_dir):
    rc, path, out, err = rob
    assert rc == 0, err
    from zsdb3kd.oracle import load_oracle
    from zsdb3kd.data import choose_subset, load_splits
    from zsdb3kd.robustness import RobustnessResult
    from zsdb3kd.weights import file_sha256

    res = RobustnessResult.load(path)
    assert res.distances.shape == (8, 10, 2)
    assert res.checkpoints.tolist() == [100, 300]
    assert res.queries.shape == (8, 10)
    assert int(res.queries.max()) <= 300 and int(res.queries.min()) >= 0
    assert res.total_queries == int(res.queries.sum()) + 8
    own = torch.nn.functional.one_hot(res.teacher_labels, 10).bool()
    assert torch.isnan(res.distances[own]).all() and (res.queries[own] == 0).all()
    other = res.distances[~own]
    assert not torch.isnan(other).any() and (other > 0).all()
    assert torch.isfinite(other[:, -1]).float().mean() > 0.5  # most boundaries were found
    assert (other[:, 1] <= other[:, 0]).all()  # more queries never make a distance worse
    # the samples are the documented deterministic subset, labelled by this teacher
    splits = load_splits("npz", str(data_dir), VAL, 0)
    idx = choose_subset(len(splits.train), 8, 0)
    assert torch.equal(res.indices, idx)
    assert torch.equal(res.teacher_labels, load_oracle(teacher[1])(splits.train.x[idx]))
    assert res.provenance["teacher_sha256"] == file_sha256(teacher[1])
    assert res.provenance["split"] == "train"
    assert not path.with_name(path.name + ".parts").exists()  # chunks cleaned up


@pytest.fixture
def label_server(teacher):
    """``teacher`` behind a label server on a free localhost port (as ``zsdb3kd serve`` runs it)."""
    import threading

    from zsdb3kd.oracle import TorchOracle
    from zsdb3kd.serve import make_server
    from zsdb3kd.weights import file_sha256

    srv = make_server(TorchOracle.from_file(teacher[1]), model_sha256=file_sha256(teacher[1]))
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_teacher_url_gives_the_same_robustness_file_as_the_weights(rob, label_server, data_dir, tmp_path):
    from zsdb3kd.robustness import RobustnessResult

    path = tmp_path / "R-http.safetensors"
    rc, out, err = _run(["robustness", "--teacher", label_server.url, *_data(data_dir), "--subset", "8",
                         "--method", "mbd", "--queries-per-pair", "300", "--checkpoints", "100,300", "--chunk-size", "4",
                         "--out", path, "--no-progress"])
    assert rc == 0, err
    local, remote = RobustnessResult.load(rob[1]), RobustnessResult.load(path)
    torch.testing.assert_close(remote.distances, local.distances, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(remote.queries, local.queries)
    assert label_server.oracle.queries == remote.total_queries == local.total_queries
    assert remote.provenance["teacher"] == label_server.url
    assert remote.provenance["teacher_sha256"] == local.provenance["teacher_sha256"]


def test_teacher_url_errors(label_server, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZSDB3KD_HTTP_DEADLINE", "2")  # a refused connection is retried until the deadline
    url = label_server.url
    assert main(["distill", "--teacher", url, "--method", "whitebox-kd", *_data(data_dir), "--subset", "10",
                 "--out", str(tmp_path / "s.safetensors")]) == 2
    assert "needs the teacher's file, not a URL" in capsys.readouterr().err
    assert main(["evaluate", "http://127.0.0.1:1/", "--data", "npz", "--data-root", str(data_dir)]) == 2
    assert "error: GET http://127.0.0.1:1/info failed" in capsys.readouterr().err


def test_evaluate_through_a_url(label_server, teacher, data_dir, capsys):
    assert main(["evaluate", label_server.url, "--data", "npz", "--data-root", str(data_dir)]) == 0
    acc_url = _accuracy_printed(capsys.readouterr().out)
    assert main(["evaluate", str(teacher[1]), "--data", "npz", "--data-root", str(data_dir)]) == 0
    assert acc_url == _accuracy_printed(capsys.readouterr().out)
    assert label_server.oracle.queries == N_TEST


def test_soft_labels(rob, tmp_path, capsys):
    from zsdb3kd.robustness import RobustnessResult
    from zsdb3kd.softlabels import logits_from_distances, soft_targets

    out = tmp_path / "S.safetensors"
    assert main(["soft-labels", str(rob[1]), "--out", str(out)]) == 0
    s = load_file(str(out))
    res = RobustnessResult.load(rob[1])
    from zsdb3kd.softlabels import load_soft_labels

    logits, idx, labels, prov = load_soft_labels(out)
    assert torch.equal(logits, s["logits"]) and torch.equal(idx, res.indices) and prov["queries_per_pair"] == 300
    assert s["logits"].shape == (8, 10) and s["soft"].shape == (8, 10)
    torch.testing.assert_close(s["logits"], logits_from_distances(res.at(300), res.teacher_labels))
    torch.testing.assert_close(s["soft"], soft_targets(s["logits"], 20.0))
    torch.testing.assert_close(s["soft"].sum(1), torch.ones(8))
    assert torch.equal(s["indices"], res.indices) and torch.equal(s["teacher_labels"], res.teacher_labels)
    assert prov["temperature"] == 20.0

    out100 = tmp_path / "S100.safetensors"
    assert main(["soft-labels", str(rob[1]), "--at-queries", "150", "--temperature", "5", "--out", str(out100)]) == 0
    s100 = load_file(str(out100))
    torch.testing.assert_close(s100["logits"], logits_from_distances(res.at(100), res.teacher_labels))
    torch.testing.assert_close(s100["soft"], soft_targets(s100["logits"], 5.0))
    capsys.readouterr()
    # no checkpoint at or below 50 queries
    assert main(["soft-labels", str(rob[1]), "--at-queries", "50", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("method, extra", [("soft", None), ("soft-file", None), ("ce", ["--subset", "200"]),
                                           ("whitebox-kd", ["--subset", "200"])])
def test_distill(method, extra, rob, teacher, data_dir, tmp_path, capsys):
    from zsdb3kd.weights import read_weights_info

    out = tmp_path / f"student-{method}.safetensors"
    if method == "soft-file":  # soft labels exported by 'soft-labels' train the same student
        method, soft = "soft", tmp_path / "S.safetensors"
        assert main(["soft-labels", str(rob[1]), "--out", str(soft)]) == 0
        extra = ["--soft-labels", str(soft)]
    extra = ["--robustness", str(rob[1])] if extra is None else extra
    rc = main(["distill", "--teacher", str(teacher[1]), *_data(data_dir), "--method", method, *extra,
               "--student", "lenet5-half", "--epochs", "2", "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.is_file()
    info = read_weights_info(out)
    assert info.arch == "lenet5-half" and info.num_classes == 10
    assert info.extra["method"] == method
    assert f"({method})" in captured.out


def test_distill_soft_needs_robustness_file(teacher, data_dir, tmp_path, capsys):
    rc = main(["distill", "--teacher", str(teacher[1]), *_data(data_dir), "--method", "soft",
               "--out", str(tmp_path / "s.safetensors"), "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--robustness FILE or --soft-labels FILE" in err and "Traceback" not in err
    assert not (tmp_path / "s.safetensors").exists()


def test_export_onnx_then_evaluate_agrees(teacher, data_dir, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    onnx_path = tmp_path / "sub" / "T.onnx"
    assert main(["export-onnx", str(teacher[1]), "--out", str(onnx_path)]) == 0
    assert onnx_path.is_file()
    capsys.readouterr()
    assert main(["evaluate", str(onnx_path), "--data", "npz", "--data-root", str(data_dir)]) == 0
    acc_onnx = _accuracy_printed(capsys.readouterr().out)
    assert main(["evaluate", str(teacher[1]), "--data", "npz", "--data-root", str(data_dir)]) == 0
    acc_torch = _accuracy_printed(capsys.readouterr().out)
    assert acc_onnx == acc_torch
    assert acc_onnx > 40.0


def test_list_models(capsys):
    assert main(["list-models"]) == 0
    names = capsys.readouterr().out.split()
    assert "lenet5" in names and "lenet5-half" in names and "lenet5-fifth" in names


def test_version_and_no_command(capsys):
    from zsdb3kd import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == __version__
    assert main([]) == 2


# ---------------------------------------------------------------------------------------
# errors: status 2 and one line naming the problem, never a traceback
# ---------------------------------------------------------------------------------------


def _assert_one_line_error(capsys, rc: int, command: str, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (captured.out, captured.err)
    assert "Traceback" not in captured.err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"zsdb3kd {command}: error:"), err
    for n in needles:
        assert n.lower() in err.lower(), (n, err)
    return err


def _robustness_argv(teacher, data_dir, out, *extra) -> list[str]:
    return ["robustness", "--teacher", str(teacher), *_data(data_dir), "--subset", "2", "--method", "bd",
            "--queries-per-pair", "20", "--out", str(out), "--no-progress", *extra]


def test_error_missing_teacher(data_dir, tmp_path, capsys):
    missing = tmp_path / "nope.safetensors"
    rc = main(_robustness_argv(missing, data_dir, tmp_path / "R.safetensors"))
    _assert_one_line_error(capsys, rc, "robustness", "nope.safetensors", "not found")
    rc = main(_robustness_argv(tmp_path / "nope.onnx", data_dir, tmp_path / "R.safetensors"))
    _assert_one_line_error(capsys, rc, "robustness", "nope.onnx", "not found")
    rc = main(["evaluate", str(missing), "--data", "npz", "--data-root", str(data_dir)])
    _assert_one_line_error(capsys, rc, "evaluate", "nope.safetensors")
    assert not (tmp_path / "R.safetensors").exists()


def test_error_unknown_dataset(teacher, data_dir, tmp_path, capsys):
    argv = _robustness_argv(teacher[1], data_dir, tmp_path / "R.safetensors")
    argv[argv.index("npz")] = "imagenet"
    rc = main(argv)
    _assert_one_line_error(capsys, rc, "robustness", "invalid choice", "imagenet", "fashion-mnist")
    rc = main(["train-teacher", "--data", "imagenet", "--out", str(tmp_path / "T.safetensors"), "--no-progress"])
    _assert_one_line_error(capsys, rc, "train-teacher", "imagenet")
    assert not (tmp_path / "T.safetensors").exists()


def test_error_missing_data_root(teacher, tmp_path, capsys):
    rc = main(["evaluate", str(teacher[1]), "--data", "npz", "--data-root", str(tmp_path / "nodata")])
    _assert_one_line_error(capsys, rc, "evaluate", "nodata")


def test_error_unknown_robustness_method(teacher, data_dir, tmp_path, capsys):
    out = tmp_path / "R.safetensors"
    argv = _robustness_argv(teacher[1], data_dir, out)
    argv[argv.index("bd")] = "no-such-method"
    rc = main(argv)
    _assert_one_line_error(capsys, rc, "robustness", "--method", "unknown estimator", "no-such-method", "mbd")
    assert not out.exists()


def test_error_pickled_whole_model_teacher(data_dir, tmp_path, capsys):
    from zsdb3kd.models import create_model

    pt = tmp_path / "whole-model.pt"
    torch.save(create_model("lenet5-fifth"), pt)
    rc = main(_robustness_argv(pt, data_dir, tmp_path / "R.safetensors", "--arch", "lenet5-fifth"))
    _assert_one_line_error(capsys, rc, "robustness", "whole-model.pt", "pickled")
    rc = main(["evaluate", str(pt), "--data", "npz", "--data-root", str(data_dir)])
    _assert_one_line_error(capsys, rc, "evaluate", "pickled")


def test_error_garbage_onnx_teacher(data_dir, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00not an onnx model\xff" * 8)
    rc = main(["evaluate", str(bad), "--data", "npz", "--data-root", str(data_dir)])
    _assert_one_line_error(capsys, rc, "evaluate", "garbage.onnx")


def test_error_soft_labels_bad_inputs(teacher, tmp_path, capsys):
    rc = main(["soft-labels", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "S.safetensors")])
    _assert_one_line_error(capsys, rc, "soft-labels", "missing.safetensors")
    rc = main(["soft-labels", str(teacher[1]), "--out", str(tmp_path / "S.safetensors")])  # weights, not robustness
    _assert_one_line_error(capsys, rc, "soft-labels", "robustness")
    assert not (tmp_path / "S.safetensors").exists()


def test_error_total_query_budget(teacher, data_dir, tmp_path, capsys):
    rc = main(_robustness_argv(teacher[1], data_dir, tmp_path / "R.safetensors", "--query-budget", "1"))
    _assert_one_line_error(capsys, rc, "robustness", "more than --query-budget 1", "nothing was spent")
    assert not (tmp_path / "R.safetensors").exists()
    assert not (tmp_path / "R.safetensors.parts").exists()


def test_error_unknown_estimator_option(teacher, data_dir, tmp_path, capsys):
    argv = _robustness_argv(teacher[1], data_dir, tmp_path / "R.safetensors")
    argv[argv.index("bd")] = "bd:bogus=1"
    rc = main(argv)
    _assert_one_line_error(capsys, rc, "robustness", "--method", "bogus")


# ---------------------------------------------------------------------------------------
# kill -9 and resume
# ---------------------------------------------------------------------------------------

RESUME_ARGS = ["--subset", "24", "--method", "mbd", "--queries-per-pair", "1000", "--checkpoints", "500,1000",
               "--chunk-size", "4"]
N_CHUNKS = 6


def test_kill_9_then_resume_equals_uninterrupted_run(teacher, data_dir, tmp_path):
    from zsdb3kd.robustness import RobustnessResult

    def argv(out: Path) -> list[str]:
        return ["robustness", "--teacher", str(teacher[1]), *_data(data_dir), *RESUME_ARGS, "--out", str(out),
                "--no-progress"]

    out = tmp_path / "resumed.safetensors"
    parts = out.with_name(out.name + ".parts")
    # same thread count as this process, so chunks computed there and here are bit-identical
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "MKL_NUM_THREADS": str(torch.get_num_threads())}
    log = (tmp_path / "child.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "zsdb3kd", *argv(out)], stdout=log, stderr=subprocess.STDOUT,
                            env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(parts.glob("chunk-*.safetensors")):
            assert proc.poll() is None, f"child exited early ({proc.returncode}): {(tmp_path / 'child.log').read_text()}"
            assert time.monotonic() < deadline, "no chunk written in 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    done = sorted(parts.glob("chunk-*.safetensors"))
    assert 1 <= len(done) < N_CHUNKS, [p.name for p in done]

    rc, _, err = _run(argv(out))
    assert rc == 0, err
    assert out.is_file() and not parts.exists()
    resumed = RobustnessResult.load(out)
    # the rerun says what it reused and what it paid
    p = resumed.provenance
    assert (f"reused {p['chunks_reused']} of {N_CHUNKS} finished chunks ({p['queries_reused_from_chunks']:,} queries "
            f"not paid again); paid {p['queries_this_session']:,} new queries") in err, err

    ref_path = tmp_path / "uninterrupted.safetensors"
    rc, _, err = _run(argv(ref_path))
    assert rc == 0, err
    ref = RobustnessResult.load(ref_path)

    assert resumed.distances.shape == ref.distances.shape == (24, 10, 2)
    assert torch.equal(torch.isnan(resumed.distances), torch.isnan(ref.distances))
    assert torch.equal(torch.nan_to_num(resumed.distances, nan=-1.0), torch.nan_to_num(ref.distances, nan=-1.0))
    assert torch.equal(resumed.queries, ref.queries)
    assert torch.equal(resumed.teacher_labels, ref.teacher_labels)
    assert torch.equal(resumed.indices, ref.indices)
    assert resumed.total_queries == ref.total_queries
    # the resumed run really reused the killed run's chunks instead of recomputing them
    assert resumed.provenance["queries_reused_from_chunks"] > 0
    assert resumed.provenance["queries_this_session"] < ref.provenance["queries_this_session"]
    assert (resumed.provenance["queries_reused_from_chunks"] + resumed.provenance["queries_this_session"]
            == ref.provenance["queries_this_session"] == ref.total_queries)
    assert ref.provenance["queries_reused_from_chunks"] == 0


def test_distill_random_reads_only_the_test_split_and_reuses_its_labels(teacher, data_dir, tmp_path, capsys,
                                                                        monkeypatch):
    import zsdb3kd.data
    from zsdb3kd.weights import read_weights_info

    real = zsdb3kd.data.load_dataset
    splits = []

    def guarded(name, root=None, split="train", **kw):
        splits.append(split)
        return real(name, root, split, **kw)

    monkeypatch.setattr(zsdb3kd.data, "load_dataset", guarded)
    out = tmp_path / "random.safetensors"
    argv = ["distill", "--teacher", str(teacher[1]), *_data(data_dir), "--method", "random", "--random-samples",
            "3000", "--random-val", "500", "--epochs", "2", "--out", str(out), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    first = capsys.readouterr().out
    assert "2,500 images, 3,000 new teacher queries" in first
    assert splits == ["test"]  # no training image or label is read
    assert read_weights_info(out).extra["method"] == "random-smooth"
    assert list((tmp_path / "random.safetensors.labels").glob("chunk-*.safetensors"))
    # a rerun reuses the stored labels: no query, the same student
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "0 new teacher queries" in second
    acc = [re.search(r"val ([0-9.]+)% .* test ([0-9.]+)%", t).groups() for t in (first, second)]
    assert acc[0] == acc[1]
    # the total query budget is enforced before the teacher is asked
    rc = main(argv + ["--labels-dir", str(tmp_path / "other"), "--query-budget", "100"])
    err = capsys.readouterr().err
    assert rc == 2 and "budget" in err and "Traceback" not in err
    rc = main(argv + ["--pseudo", "p.safetensors"])
    assert rc == 2 and "takes none of --pseudo" in capsys.readouterr().err


def test_robustness_help_names_every_estimator_preset(capsys):
    from zsdb3kd.robustness import ESTIMATORS

    assert main(["robustness", "--help"]) == 0
    out = capsys.readouterr().out
    assert [k for k in ESTIMATORS.list() if k not in out] == []


def test_sigterm_during_training_saves_and_the_rerun_resumes(data_dir, tmp_path, monkeypatch):
    # `kill` (SIGTERM) interrupts like Ctrl-C: the finished epochs are kept, the same command
    # resumes, and the teacher equals one trained without interruption
    from zsdb3kd import distill
    from zsdb3kd.weights import load_weights

    def argv(out):
        return ["train-teacher", *_data(data_dir), "--arch", "lenet5-fifth", "--epochs", "4", "--lr", "1e-2",
                "--augment", "flip-crop", "--out", out, "--no-progress"]

    out = tmp_path / "T.safetensors"
    real, calls = distill.accuracy, {"n": 0}

    def term_in_third_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(distill, "accuracy", term_in_third_epoch)
        rc, _, err = _run(argv(out))
    assert rc == 130 and "rerun the same command to resume" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    ckpt = out.with_name(out.name + ".train.pt")
    assert not out.exists() and torch.load(ckpt, weights_only=True)["state"]["epoch"] == 2
    rc, _, err = _run(argv(out))
    assert rc == 0, err
    assert not ckpt.exists()
    ref = tmp_path / "ref.safetensors"
    assert _run(argv(ref))[0] == 0
    a, b = load_weights(out)[0].state_dict(), load_weights(ref)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("stop, log", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_serve_command_end_to_end(teacher, data_dir, stop, log):
    """``zsdb3kd serve`` as a script starts it (with ``&``, so SIGINT arrives ignored): it prints its
    URL once listening, answers, and stops on SIGINT or SIGTERM; the test waits on the process.
    Each request is logged to stderr with ``--log`` only."""
    pytest.importorskip("uvicorn")
    proc = subprocess.Popen([sys.executable, "-m", "zsdb3kd", "serve", str(teacher[1]), "--port", "0",
                             *(["--log"] if log else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        line = proc.stdout.readline()  # blocks until the server is listening (or has died)
        m = re.search(r"at (http://\S+) ;", line)
        assert m, (line, proc.stderr.read() if proc.poll() is not None else "")
        rc, out, err = _run(["evaluate", m.group(1), "--data", "npz", "--data-root", data_dir])
        assert rc == 0, err
        proc.send_signal(stop)
        assert proc.wait(timeout=60) == 0
        assert f"served {N_TEST:,} queries" in proc.stdout.read()
        logged = proc.stderr.read().count("POST /predict")
        assert logged >= 1 if log else logged == 0, logged
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
