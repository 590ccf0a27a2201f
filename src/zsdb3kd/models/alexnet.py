"""The CIFAR AlexNet of the released code (full, half and quarter width)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .base import (
    DEFAULT_INPUT_SHAPE,
    MODELS,
    ImageClassifier,
    ShapeLike,
    infer_flat_size,
)

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


class AlexNet(ImageClassifier):
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
        pool = lambda: nn.MaxPool2d(kernel_size=2, stride=2)
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
        flat = infer_flat_size(self.features, self.features, self.input_shape)
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
        scale = lambda c: max(1, int(round(c * width_mult)))
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


