"""Image sets: the labelled-image container and the errors data problems raise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10", "folder", "npz")
DEFAULT_ROOTS: dict[str, str] = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
SPLITS: tuple[str, ...] = ("train", "test")
INSTALL_HINTS: dict[str, str] = {"fashion-mnist": "apt-get install dataset-fashion-mnist"}

MNIST_CLASSES: list[str] = [str(i) for i in range(10)]
FASHION_MNIST_CLASSES: list[str] = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                     "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES: list[str] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
GRAY_MODES = frozenset({"1", "L", "LA"})
CACHE_VERSION = "zsdb3kd-folder-cache-v1"


class DataError(ValueError):
    """A user-facing data problem; the message names the path, what was expected and what was found."""


@dataclass
class ImageSet:
    """A labelled image set: ``x`` float32 (N, C, H, W) in [0, 1], ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.dtype != torch.float32:
            raise DataError(f"{self.name}: x must be float32 (N, C, H, W), found {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or tuple(self.y.shape) != (self.x.shape[0],):
            raise DataError(
                f"{self.name}: y must be int64 of shape ({self.x.shape[0]},), found {self.y.dtype} {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Per-image shape (C, H, W)."""
        c, h, w = self.x.shape[1:]
        return int(c), int(h), int(w)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor | Sequence[int] | np.ndarray) -> ImageSet:
        """The samples at ``indices`` (LongTensor / int sequence / bool mask of length N), same classes."""
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        idx = idx.long().flatten()
        return ImageSet(self.x[idx], self.y[idx], list(self.classes), f"{self.name}[subset:{idx.numel()}]")


# ----------------------------------------------------------------------------- helpers

def u8_to_float(u8: np.ndarray) -> torch.Tensor:
    """uint8 array of any shape -> float32 tensor scaled to [0, 1] (a copy)."""
    out = u8.astype(np.float32)
    out /= 255.0
    return torch.from_numpy(out)


def finish(x: torch.Tensor, y: Any, classes: list[str] | None, name: str, where: Path) -> ImageSet:
    """Validate labels against ``x`` (N, C, H, W) and build the ImageSet (classes default to "0".."K-1")."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: expected integer labels of shape (N,), found {y.dtype} {y.shape}")
    if len(y) != x.shape[0]:
        raise DataError(f"{where}: found {x.shape[0]} images but {len(y)} labels")
    if len(y) == 0:
        raise DataError(f"{where}: expected at least one image, found none")
    lo, hi = int(y.min()), int(y.max())
    if classes is None:
        classes = [str(i) for i in range(max(hi, 0) + 1)]
    if lo < 0 or hi >= len(classes):
        raise DataError(f"{where}: labels must lie in [0, {len(classes) - 1}], found range [{lo}, {hi}]")
    return ImageSet(x, torch.from_numpy(y.astype(np.int64)), list(classes), name)


