"""Image datasets as float tensors: IDX (MNIST, Fashion-MNIST), CIFAR-10, image folders, npz.

Every loader returns an :class:`ImageSet` whose ``x`` is float32 (N, C, H, W) in [0, 1]
(no mean/std normalisation) and whose ``y`` is int64 (N,). Every problem with
user-supplied data raises :class:`DataError` (a ``ValueError``) naming the path, what
was expected and what was found.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from ..settings import Settings
from .base import (CIFAR10_CLASSES, DATASETS, DEFAULT_ROOTS, FASHION_MNIST_CLASSES, INSTALL_HINTS, MNIST_CLASSES,
                   SPLITS, DataError, ImageSet)
from .formats import LOADERS, peek_shape
from .splits import Splits, choose_subset, dataset_fingerprint, make_splits, train_val_split

__all__ = ["CIFAR10_CLASSES", "DATASETS", "DEFAULT_ROOTS", "DataError", "DataSettings", "FASHION_MNIST_CLASSES",
           "ImageSet", "MNIST_CLASSES", "Splits", "choose_subset", "dataset_fingerprint", "load_dataset", "load_splits",
           "train_val_split"]


class DataSettings(Settings):
    """Data: which dataset, where, and how the training split is divided."""

    name: Literal["mnist", "fashion-mnist", "cifar10", "folder", "npz"] = Field(
        "fashion-mnist", description="dataset format")
    root: str | None = Field(None, description="dataset directory (or .npz file); fashion-mnist defaults to "
                                               "/usr/share/datasets/fashion-mnist")
    val_size: int | float = Field(5000, description="training images held out for model selection: a count, or a "
                                                    "fraction in (0, 1)")
    pixel_scale: float | None = Field(None, gt=0, description="npz only: divide pixel values by this to reach "
                                                              "[0, 1] (255 for 8-bit, 16 for scikit-learn's digits)")

    @field_validator("val_size")
    @classmethod
    def _val_size(cls, v: int | float) -> int | float:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError("a fraction must lie strictly between 0 and 1")
        if isinstance(v, int) and v < 1:
            raise ValueError("a count must be >= 1")
        return v

    def image_shape(self, split: str = "test") -> tuple[int | None, int, int] | None:
        """``(C, H, W)`` of a split's images, known without reading them: fixed for the named
        datasets, from the array header of an npz, from the first image of a folder (whose
        ``C`` is ``None`` when that image is grey: a colour image elsewhere would make the
        set colour). Missing or unreadable files raise :class:`DataError`."""
        if self.name in ("npz", "folder"):
            return peek_shape(self.name, _root(self.name, self.root), split)
        return peek_shape(self.name, Path("."), split)

    def check_readable(self) -> None:
        """A ``root`` given but missing: a :class:`DataError` now, before anything is spent."""
        if self.root is not None and not Path(self.root).exists():
            raise DataError(f"{self.name}: {self.root} does not exist")

    def load(self, split: str = "train") -> ImageSet:
        return load_dataset(self.name, self.root, split, pixel_scale=self.pixel_scale)

    def splits(self, seed: int) -> Splits:
        """Train/validation (stratified, ``val_size``) and test splits."""
        return make_splits(self.load("train"), self.load("test"), self.val_size, seed)


def load_dataset(name: str, root: str | os.PathLike[str] | None = None, split: str = "train", *,
                 pixel_scale: float | None = None) -> ImageSet:
    """Load split ``split`` of dataset ``name`` from ``root`` -> ImageSet with x (N, C, H, W), y (N,).

    ``root=None`` uses :data:`DEFAULT_ROOTS`. ``pixel_scale`` (npz only) divides the stored
    values; data outside [0, 1] without it is refused. Raises :class:`DataError` for unknown
    names/splits, missing, corrupt or inconsistent files.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    if pixel_scale is not None and name != "npz":
        raise DataError(f"pixel_scale applies to npz data only; {name} files are read as 8-bit images")
    path = _root(name, root)
    if name == "npz":
        return LOADERS[name](path, name, split, pixel_scale)
    return LOADERS[name](path, name, split)


def _root(name: str, root: str | os.PathLike[str] | None) -> Path:
    """The existing data root of dataset ``name``: ``root``, or its default location."""
    if root is None:
        if name not in DEFAULT_ROOTS:
            raise DataError(f"dataset {name!r} has no default location; pass its path (--data-root)")
        root = DEFAULT_ROOTS[name]
        if not Path(root).exists():
            hint = f"install it with `{INSTALL_HINTS[name]}` or " if name in INSTALL_HINTS else ""
            raise DataError(f"{name}: default data directory {root} does not exist; {hint}pass --data-root")
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"{name}: data root {path} does not exist")
    return path


def load_splits(name: str, root: str | None, val_size: int | float, seed: int) -> Splits:
    """Train/validation/test splits of a dataset (see :meth:`DataSettings.splits`)."""
    return DataSettings(name=name, root=root, val_size=val_size).splits(seed)
