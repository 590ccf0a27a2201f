"""Tiny deterministic teachers shared by the tests.

``LinearTeacher``: logits ``W x + b`` on small images, so the exact targeted boundary
distance (with the [0, 1] box) is a small quadratic programme solved by scipy.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from zsdb3kd.oracle import TorchOracle

SHAPE = (1, 8, 8)


def load_script(name: str, path: Path):
    """The module of a script outside the package (benchmarks/, scripts/), with its own folder
    importable while it loads (a benchmark imports its neighbours)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(path.parent))

D = 64
K = 4


class LinearTeacher(nn.Module):
    def __init__(self, seed: int = 0, k: int = K) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(k, D, generator=g), requires_grad=False)
        # biases chosen so that every class owns a good part of the box
        self.b = nn.Parameter(-self.w.sum(1) * 0.5, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ self.w.T + self.b


def exact_distance(teacher: LinearTeacher, x0: torch.Tensor, t: int) -> float:
    """min ||x - x0|| s.t. class t wins at x and 0 <= x <= 1 (SLSQP, tight tolerance)."""
    from scipy.optimize import minimize

    W = teacher.w.double().numpy()
    b = teacher.b.double().numpy()
    z0 = x0.reshape(-1).double().numpy()
    cons = [
        {"type": "ineq", "fun": (lambda z, j=j: (W[t] - W[j]) @ z + b[t] - b[j]), "jac": (lambda z, j=j: W[t] - W[j])}
        for j in range(W.shape[0]) if j != t
    ]
    r = minimize(lambda z: ((z - z0) ** 2).sum(), z0, jac=lambda z: 2 * (z - z0), constraints=cons,
                 bounds=[(0.0, 1.0)] * z0.size, method="SLSQP", options={"maxiter": 1000, "ftol": 1e-14})
    assert r.success, r.message
    return float(np.sqrt(r.fun))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread (and 2-thread OpenMP spins badly on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fmnist_npz(d, n_train: int, n_test: int):
    """A directory with ``train.npz``/``test.npz`` holding the first images of the real
    Fashion-MNIST (skips the test when it is not installed or unreadable)."""
    from zsdb3kd.data import DataError, load_dataset

    try:
        train = load_dataset("fashion-mnist", split="train")
        test = load_dataset("fashion-mnist", split="test")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST unreadable: {e}")

    np.savez(d / "train.npz", x=train.x[:n_train, 0].numpy(), y=train.y[:n_train].numpy())
    np.savez(d / "test.npz", x=test.x[:n_test, 0].numpy(), y=test.y[:n_test].numpy())
    return d


@pytest.fixture
def linear_teacher() -> LinearTeacher:
    return LinearTeacher()


@pytest.fixture
def linear_oracle(linear_teacher) -> TorchOracle:
    return TorchOracle(linear_teacher, SHAPE, K)


@pytest.fixture
def linear_data(linear_teacher):
    """(pool_x, pool_y) 400 images labelled by the linear teacher, and 12 probe samples."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(400, *SHAPE, generator=g)
    with torch.no_grad():
        y = linear_teacher(x).argmax(1)
    return x, y


class LockHolder:
    """Another process holding a chunk's file lock (as a second worker would) until :meth:`release`."""

    def __init__(self, path) -> None:
        import subprocess
        import sys

        code = ("import sys, filelock; lock = filelock.FileLock(sys.argv[1], thread_local=False); lock.acquire(); "
                "print('held', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"  # waits on the holder itself, not a sleep

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(30)

    def __enter__(self) -> "LockHolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
