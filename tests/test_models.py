"""Model zoo: every registered architecture builds, runs forward/backward, and keeps the
released code's parameter names so its state dicts load with strict=True."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from zsdb3kd.models import (
    MODELS,
    count_parameters,
    create_model,
    list_models,
    parse_input_shape,
)

SHAPES = [(1, 28, 28), (3, 32, 32)]


def _conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def _linear(fin: int, fout: int) -> int:
    return fin * fout + fout


def test_registry_lists_paper_architectures() -> None:
    assert list_models() == sorted(
        [
            "mlp",
            "cnn-small",
            "lenet5",
            "lenet5-half",
            "lenet5-fifth",
            "alexnet",
            "alexnet-half",
            "alexnet-quarter",
            "resnet18",
            "resnet34",
        ]
    )
    assert list_models("lenet5*") == ["lenet5", "lenet5-fifth", "lenet5-half"]
    assert "resnet18" in MODELS


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list_models())
def test_forward_backward(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, input_shape=shape)
    assert model.num_classes == 7
    assert model.input_shape == shape
    model.train()
    x = torch.randn(4, *shape)
    logits = model(x)
    assert logits.shape == (4, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no grad for {pname}"
        assert torch.isfinite(p.grad).all(), pname
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 7)  # batch of one works in eval mode


@pytest.mark.parametrize("name", list_models())
def test_construction_leaves_batchnorm_stats_untouched(name: str) -> None:
    model = create_model(name, input_shape=(3, 32, 32))
    assert model.training
    for m in model.modules():
        assert m.training
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert int(m.num_batches_tracked) == 0
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)


def test_lenet5_parameter_counts() -> None:
    # conv1 (1->20, 5x5) + conv2 (20->50) + fc1 (50*4*4 -> 200) + fc2 (200 -> 10)
    full = _conv(1, 20, 5) + _conv(20, 50, 5) + _linear(800, 200) + _linear(200, 10)
    assert full == 187_780
    assert count_parameters(create_model("lenet5")) == full
    half = _conv(1, 10, 5) + _conv(10, 25, 5) + _linear(400, 100) + _linear(100, 10)
    assert half == 47_645
    assert count_parameters(create_model("lenet5-half")) == half
    fifth = _conv(1, 4, 5) + _conv(4, 10, 5) + _linear(160, 40) + _linear(40, 10)
    assert count_parameters(create_model("lenet5-fifth")) == fifth
    # 3x32x32 input: feature maps 50 x 5 x 5
    cifar = _conv(3, 20, 5) + _conv(20, 50, 5) + _linear(1250, 200) + _linear(200, 10)
    assert count_parameters(create_model("lenet5", input_shape=(3, 32, 32))) == cifar


def test_lenet5_flat_sizes() -> None:
    assert create_model("lenet5").fc1.in_features == 800
    assert create_model("lenet5-half").fc1.in_features == 400
    assert create_model("lenet5-fifth").fc1.in_features == 160


def test_alexnet_widths_and_flat_size() -> None:
    expected = {
        "alexnet": ([64, 192, 384, 256, 256], 4096),
        "alexnet-half": ([32, 96, 192, 128, 128], 2048),
        "alexnet-quarter": ([16, 48, 96, 64, 64], 1024),
    }
    for name, (convs, fc) in expected.items():
        model = create_model(name, input_shape=(3, 32, 32), num_classes=100)
        assert [m.out_channels for m in model.features if isinstance(m, nn.Conv2d)] == convs
        assert model.fc1[0].in_features == convs[-1] * 2 * 2
        assert model.fc1[0].out_features == fc and model.fc2[0].out_features == fc
        assert model.fc3.out_features == 100


def test_count_parameters_trainable_only() -> None:
    model = create_model("lenet5-fifth")
    model.conv1.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - model.conv1.weight.numel()


def test_lenet5_state_dict_keys() -> None:
    keys = set(create_model("lenet5").state_dict())
    assert keys == {f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2") for p in ("weight", "bias")}


def test_alexnet_state_dict_keys() -> None:
    keys = set(create_model("alexnet", input_shape=(3, 32, 32)).state_dict())
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = set()
    for conv, norm in ((0, 1), (4, 5), (8, 9), (11, 12), (14, 15)):
        expected |= {f"features.{conv}.weight", f"features.{conv}.bias"}
        expected |= {f"features.{norm}.{p}" for p in bn}
    for fc in ("fc1", "fc2"):
        expected |= {f"{fc}.0.weight", f"{fc}.0.bias"} | {f"{fc}.3.{p}" for p in bn}
    expected |= {"fc3.weight", "fc3.bias"}
    assert keys == expected
    for key in ("features.0.weight", "features.1.running_mean", "fc1.0.weight", "fc1.3.running_var", "fc3.weight"):
        assert key in keys
    assert create_model("alexnet", input_shape=(3, 32, 32)).fc1[0].in_features == 1024


def test_resnet18_state_dict_keys_follow_kuangliu() -> None:
    keys = set(create_model("resnet18", input_shape=(3, 32, 32)).state_dict())
    for key in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.conv1.weight",
        "layer1.1.bn2.bias",
        "layer2.0.shortcut.0.weight",
        "layer2.0.shortcut.1.running_var",
        "layer4.1.conv2.weight",
        "linear.weight",
        "linear.bias",
    ):
        assert key in keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)  # identity shortcut
    assert count_parameters(create_model("resnet18", input_shape=(3, 32, 32))) == 11_173_962


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ValueError) as info:
        create_model("vgg16")
    message = str(info.value)
    assert "vgg16" in message
    for name in list_models():
        assert name in message


def test_input_too_small_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="input"):
        create_model("lenet5", input_shape=(1, 8, 8))


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        create_model("lenet5", num_classes=0)
    with pytest.raises(ValueError):
        create_model("lenet5", input_shape=(28, 28))


def test_none_kwargs_fall_back_to_defaults() -> None:
    model = create_model("lenet5", num_classes=None, input_shape=None)
    assert model.num_classes == 10 and model.input_shape == (1, 28, 28)


@pytest.mark.parametrize(
    "value, expected",
    [((1, 28, 28), (1, 28, 28)), ([3, 32, 32], (3, 32, 32)), ("1,28,28", (1, 28, 28)), ("3x32x32", (3, 32, 32))],
)
def test_parse_input_shape(value: object, expected: tuple[int, int, int]) -> None:
    assert parse_input_shape(value) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["1,28", "a,b,c", (1, 0, 28), (1.0, 28, 28), 28])
def test_parse_input_shape_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_input_shape(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["mlp", "cnn-small"])
@pytest.mark.parametrize("shape", [(1, 8, 12), (3, 32, 32), (1, 28, 28), (2, 1, 1)])
def test_small_students_take_any_input_shape(name: str, shape: tuple[int, int, int]) -> None:
    model = create_model(name, num_classes=4, input_shape=shape)
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 4)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lenet5_pools_before_its_relus_with_the_same_function_and_gradients() -> None:
    """relu(maxpool(conv)) is the textbook maxpool(relu(conv)) bit for bit, gradients included."""
    torch.manual_seed(0)
    model = create_model("lenet5-half")
    x = torch.rand(32, 1, 28, 28) * 2 - 1

    def textbook(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = m.maxpool1(m.relu1(m.conv1(x)))
        x = m.maxpool2(m.relu2(m.conv2(x)))
        return m.fc2(m.relu4(m.fc1(torch.flatten(x, 1))))

    results = []
    for forward in (model, lambda x: textbook(model, x)):
        model.zero_grad()
        out = forward(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("name,shape", [("lenet5-half", (1, 28, 28)), ("alexnet-half", (3, 32, 32)),
                                        ("cnn-small", (1, 8, 12)), ("mlp", (1, 8, 12))])
def test_on_device_cpu_uses_channels_last_and_computes_the_same_function(name: str, shape, tmp_path) -> None:
    from zsdb3kd.models import on_device
    from zsdb3kd.store import read_tensors, write_tensors

    torch.manual_seed(0)
    plain = create_model(name, input_shape=shape).eval()
    fast = on_device(create_model(name, input_shape=shape), "cpu").eval()
    fast.load_state_dict(plain.state_dict())
    for p in fast.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(16, *shape)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-5, atol=1e-5)
    # its weights are saved as plain tensors and load back into a model of the default layout
    write_tensors(tmp_path / "w.safetensors", fast.state_dict())
    again = create_model(name, input_shape=shape).eval()
    again.load_state_dict(read_tensors(tmp_path / "w.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), fast(x), rtol=1e-5, atol=1e-5)
