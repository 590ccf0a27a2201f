"""LeNet-5 (full, half and fifth width), with the released code's layer names."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import (
    DEFAULT_INPUT_SHAPE,
    MODELS,
    ImageClassifier,
    ShapeLike,
    infer_flat_size,
)


class LeNet5(ImageClassifier):
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
        flat = infer_flat_size(self, self.forward_features, self.input_shape)
        self.fc1 = nn.Linear(flat, hidden)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, self.num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, c2, H', W')`` convolutional feature maps.

        Each ReLU runs after its max-pool rather than before: the same function and the same
        gradients bit for bit (both are monotone; ties resolve alike), on a quarter of the
        values."""
        x = self.relu1(self.maxpool1(self.conv1(x)))
        return self.relu2(self.maxpool2(self.conv2(x)))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, num_classes)`` logits."""
        x = torch.flatten(self.forward_features(x), 1)
        return self.fc2(self.relu4(self.fc1(x)))



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


