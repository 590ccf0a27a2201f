"""CIFAR-style ResNet-18/34 (kuangliu/pytorch-cifar layer names)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_INPUT_SHAPE, MODELS, ImageClassifier, ShapeLike


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


class ResNet(ImageClassifier):
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



@MODELS.register("resnet18")
def resnet18(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> ResNet:
    """CIFAR ResNet-18 (BasicBlock x [2, 2, 2, 2])."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, input_shape=input_shape)


@MODELS.register("resnet34")
def resnet34(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> ResNet:
    """CIFAR ResNet-34 (BasicBlock x [3, 4, 6, 3])."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes, input_shape=input_shape)


