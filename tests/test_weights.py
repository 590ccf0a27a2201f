"""Weights are stored and loaded as tensors only; pickled objects are refused, never run."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from zsdb3kd.models import create_model
from zsdb3kd.weights import (
    WeightsError,
    WeightsInfo,
    file_sha256,
    load_weights,
    read_weights_info,
    save_weights,
)


def _trained(name: str, shape: tuple[int, int, int], num_classes: int = 10) -> nn.Module:
    """A model with non-default parameters and BatchNorm statistics."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, input_shape=shape)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.train()
        model(torch.randn(8, *shape))  # updates running stats
    return model.eval()


class _Payload:
    """Unpickling this object creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name, shape", [("lenet5", (1, 28, 28)), ("alexnet-quarter", (3, 32, 32))])
def test_round_trip(tmp_path: Path, name: str, shape: tuple[int, int, int]) -> None:
    model = _trained(name, shape, num_classes=10)
    path = save_weights(
        model,
        tmp_path / "sub" / "dir" / "teacher.safetensors",
        arch=name,
        input_shape=shape,
        num_classes=10,
        extra={"dataset": "mnist", "test_acc": "0.99"},
    )
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["teacher.safetensors"]  # no temp file left

    loaded, info = load_weights(path)
    assert not loaded.training
    x = torch.randn(5, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)

    assert isinstance(info, WeightsInfo)
    assert info.arch == name and info.num_classes == 10 and info.input_shape == shape
    assert info.extra == {"dataset": "mnist", "test_acc": "0.99"}
    assert info.path == path
    assert info.sha256 == file_sha256(path) and len(info.sha256) == 64
    assert read_weights_info(path) == info

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["format"] == "zsdb3kd"
    assert meta["arch"] == name
    assert meta["num_classes"] == "10"
    assert meta["input_shape"] == ",".join(map(str, shape))


def test_sha256_stable_and_content_addressed(tmp_path: Path) -> None:
    model = _trained("lenet5-fifth", (1, 28, 28))
    a = save_weights(model, tmp_path / "a.safetensors", arch="lenet5-fifth", input_shape=(1, 28, 28), num_classes=10)
    b = save_weights(model, tmp_path / "b.safetensors", arch="lenet5-fifth", input_shape=(1, 28, 28), num_classes=10)
    assert file_sha256(a) == file_sha256(b) == read_weights_info(a).sha256
    with torch.no_grad():
        model.fc2.bias.add_(1.0)
    c = save_weights(model, tmp_path / "c.safetensors", arch="lenet5-fifth", input_shape=(1, 28, 28), num_classes=10)
    assert file_sha256(c) != file_sha256(a)


def test_overwrite_is_atomic_replace(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("lenet5-fifth")
        save_weights(model, path, arch="lenet5-fifth", input_shape=(1, 28, 28), num_classes=10)
    loaded, _ = load_weights(path)
    assert torch.equal(loaded.fc2.weight, model.fc2.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_load_to_device_and_explicit_matching_args(tmp_path: Path) -> None:
    model = _trained("lenet5-half", (1, 28, 28))
    path = save_weights(model, tmp_path / "s.safetensors", arch="lenet5-half", input_shape="1,28,28", num_classes=10)
    loaded, info = load_weights(path, device="cpu", arch="lenet5-half", num_classes=10, input_shape=(1, 28, 28))
    assert next(loaded.parameters()).device.type == "cpu"
    assert info.arch == "lenet5-half"


def test_save_refuses_mismatched_arch_or_reserved_metadata(tmp_path: Path) -> None:
    model = create_model("lenet5-half")
    with pytest.raises(WeightsError, match="does not fit"):
        save_weights(model, tmp_path / "x.safetensors", arch="lenet5", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(WeightsError, match="num_classes"):
        save_weights(model, tmp_path / "x.safetensors", arch="lenet5-half", input_shape=(1, 28, 28), num_classes=3)
    with pytest.raises(WeightsError, match="reserved"):
        save_weights(
            model, tmp_path / "x.safetensors", arch="lenet5-half", input_shape=(1, 28, 28), num_classes=10,
            extra={"arch": "alexnet"},
        )
    with pytest.raises(WeightsError, match="unknown arch"):
        save_weights(model, tmp_path / "x.safetensors", arch="nope", input_shape=(1, 28, 28), num_classes=10)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------- plain state dicts


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ""])
def test_plain_state_dict_loads_with_explicit_arch(tmp_path: Path, suffix: str) -> None:
    model = _trained("alexnet-quarter", (3, 32, 32))
    path = tmp_path / f"student_AlexNet_tiny_CIFAR10{suffix}"
    torch.save(model.state_dict(), path)
    loaded, info = load_weights(path, arch="alexnet-quarter", input_shape=(3, 32, 32), num_classes=10)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert info.arch == "alexnet-quarter" and info.extra == {}
    assert info.sha256 == file_sha256(path)


def test_wrapped_checkpoint_and_dataparallel_prefix(tmp_path: Path) -> None:
    model = _trained("lenet5-fifth", (1, 28, 28))
    path = tmp_path / "ckpt.pth"
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": state}, path)
    loaded, _ = load_weights(path, arch="lenet5-fifth", input_shape=(1, 28, 28), num_classes=10)
    assert torch.equal(loaded.fc1.weight, model.fc1.weight)


def test_plain_state_dict_without_arch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "teacher.pt"
    torch.save(create_model("lenet5").state_dict(), path)
    with pytest.raises(WeightsError, match="--arch"):
        load_weights(path)
    with pytest.raises(WeightsError, match="--input-shape"):
        load_weights(path, arch="lenet5", num_classes=10)
    with pytest.raises(WeightsError, match="--arch"):
        read_weights_info(path)


def test_key_and_shape_mismatches_are_named(tmp_path: Path) -> None:
    path = tmp_path / "half.pt"
    torch.save(create_model("lenet5-half").state_dict(), path)
    with pytest.raises(WeightsError) as info:
        load_weights(path, arch="lenet5", input_shape=(1, 28, 28), num_classes=10)
    msg = str(info.value)
    assert str(path) in msg and "conv1.weight" in msg and "shape" in msg

    state = create_model("lenet5").state_dict()
    state["extra_layer.weight"] = torch.zeros(1)
    del state["fc2.bias"]
    torch.save(state, path)
    with pytest.raises(WeightsError) as info:
        load_weights(path, arch="lenet5", input_shape=(1, 28, 28), num_classes=10)
    assert "fc2.bias" in str(info.value) and "extra_layer.weight" in str(info.value)


def test_non_state_dict_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="state_dict"):
        load_weights(path, arch="lenet5", input_shape=(1, 28, 28), num_classes=10)


# --------------------------------------------------------------------- pickled objects


def test_whole_pickled_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "teacher_LeNet5_MNIST"  # the released code saves torch.save(net, name)
    torch.save(create_model("lenet5"), path)
    with pytest.raises(WeightsError) as info:
        load_weights(path, arch="lenet5", input_shape=(1, 28, 28), num_classes=10)
    msg = str(info.value)
    assert "pickled Python objects" in msg and "state_dict" in msg and str(path) in msg
    with pytest.raises(WeightsError, match="pickled Python objects"):
        load_weights(path)  # refused before complaining about missing --arch


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_never_executed(tmp_path: Path, writer: str) -> None:
    # sanity check: the payload really runs when unpickled unsafely
    live = tmp_path / "live_marker"
    pickle.loads(pickle.dumps(_Payload(live))).close()
    assert live.exists()

    marker = tmp_path / "pwned_marker"
    path = tmp_path / "evil.pt"
    payload = {"conv1.weight": _Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)
    with pytest.raises(WeightsError, match="pickled Python objects"):
        load_weights(path, arch="lenet5", input_shape=(1, 28, 28), num_classes=10)
    assert not marker.exists()


# --------------------------------------------------------------------- broken files


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    path = save_weights(create_model("lenet5"), tmp_path / "t.safetensors", arch="lenet5",
                        input_shape=(1, 28, 28), num_classes=10)
    data = path.read_bytes()
    for cut in (4, 50, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightsError, match="t.safetensors"):
            load_weights(path)
    path.write_bytes(b"")
    with pytest.raises(WeightsError):
        read_weights_info(path)


def test_corrupt_torch_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.pt"
    torch.save(create_model("lenet5").state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(WeightsError, match="c.pt"):
        load_weights(path, arch="lenet5", input_shape=(1, 28, 28), num_classes=10)


def test_arch_mismatch_is_refused(tmp_path: Path) -> None:
    path = save_weights(create_model("lenet5"), tmp_path / "m.safetensors", arch="lenet5",
                        input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(WeightsError, match="lenet5-half"):
        load_weights(path, arch="lenet5-half")
    with pytest.raises(WeightsError, match="num_classes"):
        load_weights(path, num_classes=100)
    with pytest.raises(WeightsError, match="arch"):
        read_weights_info(path, arch="alexnet")


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(WeightsError, match="nope.safetensors"):
        load_weights(missing)
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "nope.pt", arch="lenet5", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(WeightsError):
        read_weights_info(missing)
    with pytest.raises(WeightsError):
        file_sha256(missing)


def test_weights_error_is_value_error() -> None:
    assert issubclass(WeightsError, ValueError)
