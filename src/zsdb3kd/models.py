"""Classifier architectures used as teachers and students, created by name (timm-style).

The registered architectures follow the DB3KD / ZSDB3KD paper (Wang, ICML 2021) and its
released code: LeNet-5 (full / half / fifth width) for MNIST-like data, a CIFAR AlexNet
(full / half / quarter width) and CIFAR-style ResNet-18/34. Attribute names and
``nn.Sequential`` indices are exactly those of the released code (and of the
kuangliu/pytorch-cifar ResNet), so their plain ``state_dict`` files load with
``strict=True``.

Every model

* maps images ``(B, C, H, W)`` with ``(C, H, W) == model.input_shape`` to logits
  ``(B, model.num_classes)``;
* accepts any ``input_shape`` given at construction that is large enough for its
  downsampling: the flattened feature size is inferred with one dummy forward pass
  (in eval mode under ``no_grad``, so BatchNorm running statistics are untouched).

>>> model = create_model("lenet5", num_classes=10, input_shape=(1, 28, 28))
>>> model(torch.zeros(2, 1, 28, 28)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Registry

__all__ = [
    "MODELS",
    "DEFAULT_INPUT_SHAPE",
    "InputShape",
    "ShapeLike",
    "AlexNet",
    "BasicBlock",
    "LeNet5",
    "ResNet",
    "count_parameters",
    "create_model",
    "list_models",
    "parse_input_shape",
]

InputShape = tuple[int, int, int]
"""``(channels, height, width)`` of one input image."""

ShapeLike = str | Sequence[int]
"""Anything :func:`parse_input_shape` accepts: ``(1, 28, 28)``, ``[3, 32, 32]``, ``"1,28,28"``."""

DEFAULT_INPUT_SHAPE: InputShape = (1, 28, 28)

MODELS: Registry[nn.Module] = Registry("model")


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def parse_input_shape(value: ShapeLike) -> InputShape:
    """Normalise an input shape to ``(C, H, W)`` of positive ints.

    Accepts a sequence of three ints (tuple, list, ``torch.Size``) or a string such as
    ``"1,28,28"`` / ``"3x32x32"`` (the form used in weight-file metadata and on the CLI).
    Raises ``ValueError`` for anything else.
    """
    if isinstance(value, str):
        parts = [p for p in re.split(r"[\s,xX×]+", value.strip().strip("()[]")) if p]
        try:
            dims = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"input_shape must look like 'C,H,W', got {value!r}") from None
    else:
        try:
            dims = list(value)
        except TypeError:
            raise ValueError(f"input_shape must be (C, H, W), got {value!r}") from None
        if not all(isinstance(d, Integral) and not isinstance(d, bool) for d in dims):
            raise ValueError(f"input_shape must contain ints, got {value!r}")
        dims = [int(d) for d in dims]
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise ValueError(f"input_shape must be three positive ints (C, H, W), got {value!r}")
    return (dims[0], dims[1], dims[2])


def _infer_flat_size(
    owner: nn.Module, features: Callable[[Tensor], Tensor], input_shape: InputShape
) -> int:
    """Number of features per sample that ``features`` produces for one ``input_shape`` image.

    Runs a single zero image ``(1, C, H, W)`` through ``features`` with every submodule of
    ``owner`` in eval mode and under ``no_grad`` (BatchNorm statistics stay untouched), then
    restores each submodule's previous training flag. Raises ``ValueError`` if the input is
    too small for the architecture's downsampling.
    """
    modules = list(owner.modules())
    flags = [m.training for m in modules]
    owner.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *input_shape))
    except RuntimeError as exc:
        raise ValueError(
            f"{type(owner).__name__} cannot process inputs of shape {input_shape} "
            f"(too small for its downsampling?): {exc}"
        ) from exc
    finally:
        for module, flag in zip(modules, flags):
            module.training = flag
    flat = out[0].numel()
    if flat == 0:
        raise ValueError(f"{type(owner).__name__} produces no features for input shape {input_shape}")
    return flat


class _ImageClassifier(nn.Module):
    """Base class: stores and validates ``num_classes`` and ``input_shape``."""

    num_classes: int
    input_shape: InputShape

    def __init__(self, num_classes: int, input_shape: ShapeLike) -> None:
        super().__init__()
        if not isinstance(num_classes, Integral) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.input_shape = parse_input_shape(input_shape)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, input_shape={self.input_shape}"


# ---------------------------------------------------------------------------------------
# LeNet-5
# ---------------------------------------------------------------------------------------


class LeNet5(_ImageClassifier):
    """LeNet-5 as in the DB3KD code: ``[conv5x5 -> ReLU -> maxpool2] x2 -> fc -> ReLU -> fc``.

    Args:
        widths: ``(conv1 channels, conv2 channels, hidden fc units)``; the paper's teacher
            uses ``(20, 50, 200)``, its students ``(10, 25, 100)`` and ``(4, 10, 40)``.
        num_classes: number of output logits.
        input_shape: ``(C, H, W)``; for ``(1, 28, 28)`` the flattened feature size is
            ``widths[1] * 4 * 4``.

    Shapes: ``(B, C, H, W) -> (B, num_classes)``.
    """

    def __init__(
        self,
        widths: tuple[int, int, int] = (20, 50, 200),
        num_classes: int = 10,
        input_shape: ShapeLike = DEFAULT_INPUT_SHAPE,
    ) -> None:
        super().__init__(num_classes, input_shape)
        c1, c2, hidden = widths
        self.conv1 = nn.Conv2d(self.input_shape[0], c1, kernel_size=5)
        self.relu1 = nn.ReLU()
        self.maxpool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=5)
        self.relu2 = nn.ReLU()
        self.maxpool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        flat = _infer_flat_size(self, self.forward_features, self.input_shape)
        self.fc1 = nn.Linear(flat, hidden)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, self.num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, c2, H', W')`` convolutional feature maps."""
        x = self.maxpool1(self.relu1(self.conv1(x)))
        return self.maxpool2(self.relu2(self.conv2(x)))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, num_classes)`` logits."""
        x = torch.flatten(self.forward_features(x), 1)
        return self.fc2(self.relu4(self.fc1(x)))


# ---------------------------------------------------------------------------------------
# AlexNet (CIFAR variant with BatchNorm)
# ---------------------------------------------------------------------------------------

_ALEXNET_CONV_WIDTHS = (64, 192, 384, 256, 256)
_ALEXNET_FC_WIDTH = 4096


def _conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


def _fc_relu_dropout_bn(in_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, out_features),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.BatchNorm1d(out_features),
    )


class AlexNet(_ImageClassifier):
    """The CIFAR AlexNet of the DB3KD code (BatchNorm after every conv and fc layer).

    ``features`` (Sequential indices as in the released code)::

        0 conv3x3/s2 -> 1 BN -> 2 ReLU -> 3 maxpool2
        4 conv3x3    -> 5 BN -> 6 ReLU -> 7 maxpool2
        8 conv3x3 -> 9 BN -> 10 ReLU -> 11 conv3x3 -> 12 BN -> 13 ReLU
        14 conv3x3 -> 15 BN -> 16 ReLU -> 17 maxpool2

    then ``fc1``/``fc2`` = ``Sequential(Linear, ReLU, Dropout, BatchNorm1d)`` and ``fc3``
    = ``Linear``. For ``(3, 32, 32)`` inputs the flattened feature size is
    ``conv_widths[-1] * 2 * 2``.

    Args:
        conv_widths: output channels of the five conv layers.
        fc_width: units of the two hidden fully-connected layers.
        num_classes, input_shape: as for every model.

    Shapes: ``(B, C, H, W) -> (B, num_classes)``. As with any ``BatchNorm1d`` network,
    training mode needs ``B >= 2``.
    """

    def __init__(
        self,
        conv_widths: Sequence[int] = _ALEXNET_CONV_WIDTHS,
        fc_width: int = _ALEXNET_FC_WIDTH,
        num_classes: int = 10,
        input_shape: ShapeLike = DEFAULT_INPUT_SHAPE,
    ) -> None:
        super().__init__(num_classes, input_shape)
        w = list(conv_widths)
        if len(w) != 5:
            raise ValueError(f"AlexNet needs 5 conv widths, got {conv_widths!r}")
        pool = lambda: nn.MaxPool2d(kernel_size=2, stride=2)  # noqa: E731
        self.features = nn.Sequential(
            *_conv_bn_relu(self.input_shape[0], w[0], stride=2),
            pool(),
            *_conv_bn_relu(w[0], w[1]),
            pool(),
            *_conv_bn_relu(w[1], w[2]),
            *_conv_bn_relu(w[2], w[3]),
            *_conv_bn_relu(w[3], w[4]),
            pool(),
        )
        flat = _infer_flat_size(self.features, self.features, self.input_shape)
        self.fc1 = _fc_relu_dropout_bn(flat, fc_width)
        self.fc2 = _fc_relu_dropout_bn(fc_width, fc_width)
        self.fc3 = nn.Linear(fc_width, self.num_classes)

    @classmethod
    def scaled(
        cls, width_mult: float, num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE
    ) -> AlexNet:
        """AlexNet with every conv and fc width multiplied by ``width_mult`` (0.5 = half)."""
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        scale = lambda c: max(1, int(round(c * width_mult)))  # noqa: E731
        return cls(
            conv_widths=[scale(c) for c in _ALEXNET_CONV_WIDTHS],
            fc_width=scale(_ALEXNET_FC_WIDTH),
            num_classes=num_classes,
            input_shape=input_shape,
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, num_classes)`` logits."""
        x = torch.flatten(self.features(x), 1)
        return self.fc3(self.fc2(self.fc1(x)))


# ---------------------------------------------------------------------------------------
# ResNet (CIFAR-style, kuangliu/pytorch-cifar naming)
# ---------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut.

    Shapes: ``(B, in_planes, H, W) -> (B, planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(_ImageClassifier):
    """CIFAR-style ResNet: 3x3 stem (stride 1, no max-pool), four stages, global average pool.

    Args:
        num_blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        widths: channels of the four stages (the stem has ``widths[0]``).
        num_classes, input_shape: as for every model; any ``H, W >= 1`` work since the
            pooling is adaptive (for 32x32 it equals kuangliu's ``avg_pool2d(out, 4)``).

    Shapes: ``(B, C, H, W) -> (B, num_classes)``.
    """

    def __init__(
        self,
        num_blocks: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        input_shape: ShapeLike = DEFAULT_INPUT_SHAPE,
    ) -> None:
        super().__init__(num_classes, input_shape)
        if len(num_blocks) != 4 or len(widths) != 4:
            raise ValueError("ResNet needs four stages (num_blocks and widths of length 4)")
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(self.input_shape[0], widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(widths[0], num_blocks[0], stride=1)
        self.layer2 = self._make_layer(widths[1], num_blocks[1], stride=2)
        self.layer3 = self._make_layer(widths[2], num_blocks[2], stride=2)
        self.layer4 = self._make_layer(widths[3], num_blocks[3], stride=2)
        self.linear = nn.Linear(widths[3] * BasicBlock.expansion, self.num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        blocks: list[nn.Module] = []
        for s in [stride] + [1] * (num_blocks - 1):
            blocks.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*blocks)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, widths[3])`` globally pooled features."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, num_classes)`` logits."""
        return self.linear(self.forward_features(x))


# ---------------------------------------------------------------------------------------
# registered factories
# ---------------------------------------------------------------------------------------

@MODELS.register("lenet5")
def lenet5(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> LeNet5:
    """LeNet-5 teacher (20, 50, 200); 187,780 parameters for 1x28x28 and 10 classes."""
    return LeNet5((20, 50, 200), num_classes=num_classes, input_shape=input_shape)


@MODELS.register("lenet5-half")
def lenet5_half(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> LeNet5:
    """LeNet-5-Half student (10, 25, 100)."""
    return LeNet5((10, 25, 100), num_classes=num_classes, input_shape=input_shape)


@MODELS.register("lenet5-fifth")
def lenet5_fifth(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> LeNet5:
    """LeNet-5-Fifth student (4, 10, 40)."""
    return LeNet5((4, 10, 40), num_classes=num_classes, input_shape=input_shape)


@MODELS.register("alexnet")
def alexnet(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> AlexNet:
    """CIFAR AlexNet teacher (conv 64-192-384-256-256, fc 4096)."""
    return AlexNet.scaled(1.0, num_classes=num_classes, input_shape=input_shape)


@MODELS.register("alexnet-half")
def alexnet_half(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> AlexNet:
    """AlexNet-Half student (conv 32-96-192-128-128, fc 2048)."""
    return AlexNet.scaled(0.5, num_classes=num_classes, input_shape=input_shape)


@MODELS.register("alexnet-quarter")
def alexnet_quarter(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> AlexNet:
    """AlexNet-Quarter student (conv 16-48-96-64-64, fc 1024)."""
    return AlexNet.scaled(0.25, num_classes=num_classes, input_shape=input_shape)


@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> ResNet:
    """CIFAR ResNet-18 (BasicBlock x [2, 2, 2, 2])."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, input_shape=input_shape)


@MODELS.register("resnet34")
def resnet34(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> ResNet:
    """CIFAR ResNet-34 (BasicBlock x [3, 4, 6, 3])."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes, input_shape=input_shape)


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------


def create_model(
    name: str,
    num_classes: int = 10,
    input_shape: ShapeLike = DEFAULT_INPUT_SHAPE,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered architecture ``name`` (``None`` kwargs fall back to defaults).

    The returned module has ``num_classes`` and ``input_shape`` attributes and maps
    ``(B, *input_shape)`` images to ``(B, num_classes)`` logits. Unknown names raise
    ``ValueError`` listing the known ones; inputs too small for the architecture raise
    ``ValueError`` too.
    """
    return MODELS.create(name, num_classes=num_classes, input_shape=input_shape, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered architectures matching a shell-style ``pattern``."""
    return MODELS.list(pattern)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model`` (buffers such as BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
