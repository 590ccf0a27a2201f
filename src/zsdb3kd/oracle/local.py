"""A local PyTorch classifier exposed through labels only."""

from __future__ import annotations

import os

import torch
from torch import nn

from ..models import on_device
from .base import LabelOracle


class TorchOracle(LabelOracle):
    """A local PyTorch classifier exposed through labels only.

    The model is kept private and put in eval mode; only ``argmax`` of its logits leaves.
    """

    _labels_in_range = True  # the argmax of exactly num_classes scores (checked in _predict)

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, **kwargs) -> None:
        super().__init__(input_shape, num_classes, **kwargs)
        self.__model = on_device(model, self.device).eval()

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.__model(x.to(self.device, torch.float32))
        if scores.dim() != 2 or scores.shape[1] != self.num_classes:
            raise RuntimeError(f"teacher returned scores of shape {tuple(scores.shape)}, expected "
                               f"({x.shape[0]}, {self.num_classes})")
        return scores.argmax(dim=1)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, device: str = "cpu", arch: str | None = None,
                  input_shape=None, num_classes: int | None = None, **kwargs) -> "TorchOracle":
        """Load a teacher from a weights file (see :mod:`zsdb3kd.weights`); ``arch``,
        ``input_shape`` and ``num_classes`` describe a plain state dict."""
        from ..weights import load_weights

        model, info = load_weights(path, device=device, arch=arch, input_shape=input_shape, num_classes=num_classes)
        oracle = cls(model, info.input_shape, info.num_classes, device=device, **kwargs)
        oracle.source = info
        return oracle


