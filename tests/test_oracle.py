"""The label-only oracle: query accounting, budget, input validation, Torch/ONNX/function back ends."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zsdb3kd.oracle import (
    Bounds, FunctionOracle, LabelOracle, OnnxOracle, QueryBudgetExceeded, TorchOracle, load_oracle,
)

SHAPE = (1, 4, 4)


K = 3


class CountingModel(nn.Module):
    """Logits = fixed linear map of the image; records the batch size of every forward call."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(K, math.prod(SHAPE), generator=g), requires_grad=False)
        self.calls: list[int] = []
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(x.shape[0]))
        self.seen.append(x.detach().clone())
        return x.reshape(x.shape[0], -1) @ self.w.T - self.w.sum(1) * 0.5

    @property
    def images(self) -> int:
        return sum(self.calls)


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model() -> CountingModel:
    return CountingModel()


# ---------------------------------------------------------------------------------------
# counting and chunking
# ---------------------------------------------------------------------------------------


def test_queries_equal_images_sent(model):
    o = TorchOracle(model, SHAPE, K)
    assert o.queries == 0
    o(_x(5))
    o(_x(1, 1))
    o(_x(12, 2))
    assert model.images == 18
    assert o.queries == model.images == 18


@pytest.mark.parametrize("n, max_batch, chunks", [(10, 3, [3, 3, 3, 1]), (9, 3, [3, 3, 3]), (2, 5, [2]), (7, 1, [1] * 7)])
def test_chunking_respects_max_batch_and_counts_each_image_once(model, n, max_batch, chunks):
    o = TorchOracle(model, SHAPE, K, max_batch=max_batch)
    x = _x(n)
    labels = o(x)
    assert model.calls == chunks
    assert o.queries == n == model.images
    # chunked answers equal a single full-batch answer, in order
    with torch.no_grad():
        expected = model(x).argmax(1)
    assert torch.equal(labels, expected)


def test_empty_batch_costs_nothing(model):
    o = TorchOracle(model, SHAPE, K, budget=0)
    out = o(torch.empty(0, *SHAPE))
    assert out.shape == (0,) and out.dtype == torch.int64
    assert o.queries == 0 and model.calls == []


def test_torch_oracle_returns_only_int64_labels(model):
    o = TorchOracle(model, SHAPE, K)
    x = _x(20)
    out = o(x)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.int64 and out.shape == (20,)
    with torch.no_grad():
        assert torch.equal(out, model(x).argmax(1))
    assert int(out.min()) >= 0 and int(out.max()) < K
    assert len(out.unique()) >= 2  # the model is not constant, so the test means something


def test_torch_oracle_puts_model_in_eval_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.Dropout(0.9), nn.Linear(32, K))
    net.train()
    o = TorchOracle(net, SHAPE, K)
    x = _x(64)
    a, b = o(x), o(x)
    assert torch.equal(a, b)  # dropout off: deterministic answers
    with torch.no_grad():
        assert torch.equal(a, net.eval()(x).argmax(1))


def test_float64_input_is_accepted(model):
    o = TorchOracle(model, SHAPE, K)
    x = _x(4)
    assert torch.equal(o(x.double()), o(x))
    assert o.queries == 8


# ---------------------------------------------------------------------------------------
# budget
# ---------------------------------------------------------------------------------------


def test_budget_exact_fit_then_refusal_before_sending(model):
    o = TorchOracle(model, SHAPE, K, budget=10, max_batch=4)
    o(_x(6))
    assert o.queries == 6 and o.remaining == 4
    calls_before = list(model.calls)
    with pytest.raises(QueryBudgetExceeded) as ei:
        o(_x(5))  # 6 + 5 > 10: refused as a whole, nothing sent (no partial chunk either)
    assert ei.value.requested == 5 and ei.value.used == 6 and ei.value.budget == 10
    assert o.queries == 6
    assert model.calls == calls_before
    o(_x(4))  # exact fit
    assert o.queries == 10 == model.images and o.remaining == 0
    with pytest.raises(QueryBudgetExceeded):
        o(_x(1))
    assert o.queries == 10 == model.images


def test_budget_larger_than_one_call_but_call_larger_than_budget(model):
    o = TorchOracle(model, SHAPE, K, budget=7, max_batch=2)
    with pytest.raises(QueryBudgetExceeded):
        o(_x(8))
    assert o.queries == 0 and model.calls == []
    o(_x(7))
    assert o.queries == 7 and model.calls == [2, 2, 2, 1]


def test_zero_budget_refuses_any_image(model):
    o = TorchOracle(model, SHAPE, K, budget=0)
    with pytest.raises(QueryBudgetExceeded):
        o(_x(1))
    assert o.queries == 0 and model.calls == []


def test_unlimited_budget_has_no_remaining(model):
    o = TorchOracle(model, SHAPE, K)
    assert o.budget is None and o.remaining is None
    o(_x(3))
    assert o.remaining is None


def test_budget_error_is_a_runtime_error_with_actionable_message():
    e = QueryBudgetExceeded(5, 6, 10)
    assert isinstance(e, RuntimeError)
    assert "4" in str(e) and "10" in str(e)


# ---------------------------------------------------------------------------------------
# input validation: clear errors, nothing counted, nothing sent
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, exc",
    [
        (torch.full((2, *SHAPE), 1.01), ValueError),  # above the box
        (torch.full((2, *SHAPE), -0.01), ValueError),  # below the box
        (torch.tensor([0.0, 1.5]).reshape(2, 1, 1, 1).expand(2, *SHAPE).contiguous(), ValueError),  # one bad
        (torch.full((2, *SHAPE), float("inf")), ValueError),
        (torch.rand(2, 1, 4, 5), ValueError),  # wrong image shape
        (torch.rand(2, 2, 4, 4), ValueError),  # wrong channels
        (torch.rand(1, 4, 4), ValueError),  # missing batch dimension
        (torch.rand(1, 1, 1, 4, 4), ValueError),  # extra dimension
        (torch.zeros(2, *SHAPE, dtype=torch.uint8), TypeError),  # integer images
        (torch.zeros(2, *SHAPE, dtype=torch.int64), TypeError),
        (torch.zeros(2, *SHAPE, dtype=torch.bool), TypeError),
        (torch.rand(2, *SHAPE).numpy(), TypeError),  # not a tensor
        ([[0.5]], TypeError),
    ],
)
def test_invalid_inputs_raise_and_are_not_counted(model, bad, exc):
    o = TorchOracle(model, SHAPE, K, budget=100)
    with pytest.raises(exc):
        o(bad)
    assert o.queries == 0 and model.calls == []
    o(_x(2))  # still usable afterwards
    assert o.queries == 2


def test_nan_input_is_rejected(model):
    o = TorchOracle(model, SHAPE, K)
    x = _x(2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        o(x)
    assert o.queries == 0 and model.calls == []


def test_round_off_outside_box_is_tolerated_and_clamped(model):
    o = TorchOracle(model, SHAPE, K)
    x = _x(3)
    x[0] = 1 + 5e-7
    x[1] = -5e-7
    o(x)
    assert o.queries == 3
    sent = model.seen[-1]
    assert float(sent.min()) >= 0.0 and float(sent.max()) <= 1.0


def test_custom_bounds():
    seen = []

    def fn(x):
        seen.append(x.clone())
        return torch.zeros(x.shape[0], dtype=torch.long)

    o = FunctionOracle(fn, SHAPE, K, bounds=Bounds(-1.0, 1.0))
    o(torch.full((2, *SHAPE), -0.5))
    assert o.queries == 2
    with pytest.raises(ValueError):
        o(torch.full((1, *SHAPE), 1.2))
    with pytest.raises(ValueError):
        o(torch.full((1, *SHAPE), -1.2))
    assert o.queries == 2 and len(seen) == 1


@pytest.mark.parametrize(
    "kwargs",
    [dict(input_shape=(4, 4), num_classes=3), dict(input_shape=(1, 0, 4), num_classes=3),
     dict(input_shape=SHAPE, num_classes=1), dict(input_shape=SHAPE, num_classes=3, budget=-1),
     dict(input_shape=SHAPE, num_classes=3, max_batch=0)],
)
def test_constructor_validation(kwargs):
    shape = kwargs.pop("input_shape")
    nc = kwargs.pop("num_classes")
    with pytest.raises(ValueError):
        FunctionOracle(lambda x: torch.zeros(x.shape[0]), shape, nc, **kwargs)


def test_teacher_returning_wrong_shape_is_an_error():
    o = FunctionOracle(lambda x: torch.zeros(x.shape[0] + 1), SHAPE, K)
    with pytest.raises(RuntimeError):
        o(_x(3))


def test_default_teacher_calls_are_small_on_the_cpu_and_large_on_a_gpu(tmp_path):
    """256 images per call on the CPU (cache-sized), 16,384 for a local teacher on a GPU;
    an explicit max_batch always wins."""
    from zsdb3kd.models import create_model
    from zsdb3kd.oracle.load import GPU_MAX_BATCH, default_max_batch
    from zsdb3kd.weights import save_weights

    assert default_max_batch("cpu") == 256 and default_max_batch("cuda:1") == GPU_MAX_BATCH == 16_384
    path = save_weights(create_model("mlp", num_classes=K, input_shape=SHAPE), tmp_path / "t.safetensors",
                        arch="mlp", input_shape=SHAPE, num_classes=K)
    assert load_oracle(path).max_batch == 256 and load_oracle(path, max_batch=8).max_batch == 8


def test_a_label_outside_the_classes_is_an_error():
    """A callable's labels are range-checked; a torch model's argmax is in range once its score
    width is num_classes, which is checked instead (for free: no wait for the device)."""
    with pytest.raises(RuntimeError, match=r"label outside \[0, 3\)"):
        FunctionOracle(lambda x: torch.full((x.shape[0],), K), SHAPE, K)(_x(3))
    wide = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), K + 2))
    with pytest.raises(RuntimeError, match=r"scores of shape \(3, 5\), expected \(3, 3\)"):
        TorchOracle(wide, SHAPE, K)(_x(3))


# ---------------------------------------------------------------------------------------
# FunctionOracle
# ---------------------------------------------------------------------------------------


def test_function_oracle_wraps_a_callable_and_counts():
    batches = []

    def api(x: torch.Tensor):
        batches.append(x.shape[0])
        return (x.reshape(x.shape[0], -1).mean(1) > 0.5).long().tolist()  # any label-like sequence

    o = FunctionOracle(api, SHAPE, 2, max_batch=4, budget=20)
    x = torch.cat([torch.full((3, *SHAPE), 0.2), torch.full((6, *SHAPE), 0.8)])
    out = o(x)
    assert out.dtype == torch.int64 and out.shape == (9,)
    assert out.tolist() == [0] * 3 + [1] * 6
    assert batches == [4, 4, 1]
    assert o.queries == 9 and o.remaining == 11
    assert isinstance(o, LabelOracle)


# ---------------------------------------------------------------------------------------
# ONNX and files
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory):
    """A lenet5 teacher whose labels vary on random images, saved as safetensors and ONNX."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from zsdb3kd.export import export_onnx
    from zsdb3kd.models import create_model
    from zsdb3kd.weights import save_weights

    torch.manual_seed(0)
    m = create_model("lenet5", num_classes=10, input_shape=(1, 28, 28)).eval()
    # a random LeNet answers one class for all noise images; point fc2 along the main
    # directions of feature variation so that random images get all ten labels
    x = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    feats = []
    h = m.relu4.register_forward_hook(lambda mod, i, o: feats.append(o))
    with torch.no_grad():
        m(x)
        h.remove()
        f = feats[0]
        _, _, v = torch.pca_lowrank(f - f.mean(0), q=10, center=False)
        m.fc2.weight.copy_(v.T * 10)
        m.fc2.bias.copy_(-(v.T * 10) @ f.mean(0))
    d = tmp_path_factory.mktemp("onnx")
    w = save_weights(m, d / "lenet5.safetensors", arch="lenet5", input_shape=(1, 28, 28), num_classes=10)
    onnx_path = export_onnx(w, d / "lenet5.onnx")
    return w, onnx_path


def test_onnx_oracle_agrees_with_torch_oracle(lenet_files):
    w, onnx_path = lenet_files
    t = load_oracle(w)
    o = load_oracle(onnx_path, max_batch=7)
    assert isinstance(t, TorchOracle) and isinstance(o, OnnxOracle)
    assert o.input_shape == (1, 28, 28) and o.num_classes == 10
    x = torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(11))
    a, b = t(x), o(x)
    assert b.dtype == torch.int64 and b.shape == (100,)
    assert len(a.unique()) >= 5  # labels really vary
    assert torch.equal(a, b)
    assert t.queries == o.queries == 100
    o(x[:3])
    assert o.queries == 103


def test_onnx_oracle_budget_and_validation(lenet_files):
    _, onnx_path = lenet_files
    o = load_oracle(onnx_path, budget=10, max_batch=3)
    assert o.budget == 10 and o.max_batch == 3
    o(torch.rand(10, 1, 28, 28))
    with pytest.raises(QueryBudgetExceeded):
        o(torch.rand(1, 1, 28, 28))
    assert o.queries == 10
    o2 = OnnxOracle(onnx_path)
    with pytest.raises(ValueError):
        o2(torch.full((1, 1, 28, 28), 2.0))
    with pytest.raises(ValueError):
        o2(torch.rand(1, 1, 32, 32))
    assert o2.queries == 0


def test_load_oracle_dispatches_on_suffix(lenet_files, tmp_path):
    w, onnx_path = lenet_files
    upper = tmp_path / "TEACHER.ONNX"
    upper.write_bytes(onnx_path.read_bytes())
    assert isinstance(load_oracle(upper), OnnxOracle)
    assert isinstance(load_oracle(onnx_path), OnnxOracle)
    t = load_oracle(w, budget=5, max_batch=2)
    assert isinstance(t, TorchOracle) and t.budget == 5 and t.max_batch == 2
    assert t.input_shape == (1, 28, 28) and t.num_classes == 10
    # a weights file renamed to .onnx is opened as ONNX and refused as such
    fake = tmp_path / "weights.onnx"
    fake.write_bytes(w.read_bytes())
    with pytest.raises(ValueError):
        load_oracle(fake)


def test_missing_onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    with pytest.raises(FileNotFoundError):
        load_oracle(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError):
        OnnxOracle(tmp_path / "nope.onnx")


def test_garbage_onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    p = tmp_path / "garbage.onnx"
    p.write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    with pytest.raises(ValueError):
        load_oracle(p)


def test_missing_teacher_file_is_named_before_anything_is_read(tmp_path):
    for name in ("nope.safetensors", "nope.pt", "nope.onnx"):
        with pytest.raises(FileNotFoundError, match=f"teacher file not found: .*{name}"):
            load_oracle(tmp_path / name)
