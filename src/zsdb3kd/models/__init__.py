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

from typing import Any

from torch import nn

from .alexnet import AlexNet
from .base import DEFAULT_INPUT_SHAPE, MODELS, InputShape, ShapeLike, on_device, parse_input_shape
from .lenet import LeNet5
from .resnet import BasicBlock, ResNet
from .small import MLP, SmallCNN  # each import also registers its factories

__all__ = [
    "DEFAULT_INPUT_SHAPE",
    "MLP",
    "MODELS",
    "AlexNet",
    "BasicBlock",
    "InputShape",
    "LeNet5",
    "ResNet",
    "ShapeLike",
    "SmallCNN",
    "count_parameters",
    "create_model",
    "list_models",
    "on_device",
    "parse_input_shape",
]



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
