"""What every classifier here shares: ``(C, H, W)`` input shapes, the model registry and the
base class that stores ``num_classes`` and ``input_shape``."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from numbers import Integral

import torch
from torch import Tensor, nn

from ..registry import Registry

InputShape = tuple[int, int, int]
"""``(channels, height, width)`` of one input image."""

ShapeLike = str | Sequence[int]
"""Anything :func:`parse_input_shape` accepts: ``(1, 28, 28)``, ``[3, 32, 32]``, ``"1,28,28"``."""

DEFAULT_INPUT_SHAPE: InputShape = (1, 28, 28)

MODELS: Registry[nn.Module] = Registry("model")


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


def on_device(model: nn.Module, device: str | torch.device) -> nn.Module:
    """``model`` moved to ``device`` (in place, returned). On the CPU its 4-D weights take the
    channels-last layout, oneDNN's fast path for small convolutions: the same function summed
    in another order, at 1.2-1.7x the training rate and 1.3-2.4x the inference rate of the
    default layout for LeNet-5, LeNet-5-half, AlexNet-half and cnn-small on one core
    (benchmarks/layout.py). Other devices keep the default layout."""
    model.to(device)
    if torch.device(device).type == "cpu":
        model.to(memory_format=torch.channels_last)
    return model


def infer_flat_size(
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


class ImageClassifier(nn.Module):
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
