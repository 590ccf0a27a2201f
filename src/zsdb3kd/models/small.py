"""Small students for any input shape: an MLP and a CNN that adapts to the image size.

LeNet-5 and AlexNet need images large enough for their pooling; these two work from a
single pixel up, so a teacher on 8x8 (scikit-learn's ``digits``) or 8x12 inputs still
gets a student.
"""

from __future__ import annotations

from torch import Tensor, nn

from .base import DEFAULT_INPUT_SHAPE, MODELS, ImageClassifier, ShapeLike


class MLP(ImageClassifier):
    """Flatten, then ``len(widths)`` hidden layers with ReLU, then the classifier.

    Shapes: ``(B, C, H, W) -> (B, num_classes)``.
    """

    def __init__(self, widths: tuple[int, ...] = (256, 128), num_classes: int = 10,
                 input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> None:
        super().__init__(num_classes, input_shape)
        c, h, w = self.input_shape
        layers: list[nn.Module] = [nn.Flatten()]
        prev = c * h * w
        for width in widths:
            layers += [nn.Linear(prev, width), nn.ReLU(inplace=True)]
            prev = width
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(prev, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class SmallCNN(ImageClassifier):
    """Two 3x3 conv blocks (``widths[0]``, ``widths[1]`` channels, BatchNorm, ReLU), each
    followed by a 2x2 max-pool only while the image is at least 8 pixels on its short side,
    then global average pooling and a linear classifier: any ``H, W >= 1`` works.

    Shapes: ``(B, C, H, W) -> (B, num_classes)``.
    """

    def __init__(self, widths: tuple[int, int] = (32, 64), num_classes: int = 10,
                 input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> None:
        super().__init__(num_classes, input_shape)
        c, h, w = self.input_shape
        layers: list[nn.Module] = []
        prev = c
        for width in widths:
            layers += [nn.Conv2d(prev, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if min(h, w) >= 8:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            prev = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(prev, self.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@MODELS.register("mlp")
def mlp(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> MLP:
    """MLP student (256, 128 hidden units) for any input shape."""
    return MLP((256, 128), num_classes=num_classes, input_shape=input_shape)


@MODELS.register("cnn-small")
def cnn_small(num_classes: int = 10, input_shape: ShapeLike = DEFAULT_INPUT_SHAPE) -> SmallCNN:
    """Small CNN student (32, 64 channels, global pooling) for any input shape."""
    return SmallCNN((32, 64), num_classes=num_classes, input_shape=input_shape)
