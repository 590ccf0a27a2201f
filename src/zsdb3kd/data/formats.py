"""Readers of the on-disk formats: IDX (MNIST, Fashion-MNIST), CIFAR-10 batches, image
folders (with a uint8 cache) and npz. Pickled CIFAR batches are untrusted input and are
read with a restricted unpickler that can only rebuild dicts, lists, strings, ints and
plain numpy arrays."""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ..store import atomic_write
from .base import (CACHE_VERSION, CIFAR10_CLASSES, FASHION_MNIST_CLASSES, GRAY_MODES, IMAGE_EXTS, MNIST_CLASSES,
                   SPLITS, DataError, ImageSet, finish, u8_to_float)

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- IDX (MNIST family)

_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gzip if it ends in .gz) into a uint8 array with ``ndim`` dims."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file (corrupt or truncated?): {e}") from e
    magic = raw[:4]
    if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] != 0x08 or magic[3] != ndim:
        raise DataError(f"{path}: expected IDX magic 0x000008{ndim:02x} (uint8, {ndim} dims), found 0x{magic.hex()}")
    header = 4 + 4 * ndim
    try:
        dims = struct.unpack(f">{ndim}I", raw[4:header])
    except struct.error as e:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)") from e
    if len(raw) != header + math.prod(dims):
        raise DataError(f"{path}: IDX dims {dims} need {header + math.prod(dims)} bytes, found {len(raw)}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx(root: Path, name: str, split: str) -> ImageSet:
    sub = "MNIST" if name == "mnist" else "FashionMNIST"
    dirs = (root, root / sub / "raw")
    stems = _IDX_STEMS[split]
    for d in dirs:
        found = [next((p for p in (d / s, d / f"{s}.gz") if p.is_file()), None) for s in stems]
        if found[0] is not None and found[1] is not None:
            images, labels = _read_idx(found[0], 3), _read_idx(found[1], 1)
            classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
            return finish(u8_to_float(images[:, None]), labels, classes, f"{name}/{split}", found[0].parent)
    raise DataError(
        f"{name}: expected {stems[0]}[.gz] and {stems[1]}[.gz] in {dirs[0]} or {dirs[1]}; found neither pair"
    )


# ----------------------------------------------------------------------------- CIFAR-10

def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` (used by protocol<=2 pickles to store bytes); latin-1 only."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _safe_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("builtins", "dict"): dict, ("builtins", "list"): list, ("builtins", "bytes"): bytes,
        ("builtins", "str"): str, ("builtins", "int"): int, ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 numpy arrays
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only an allow-list of globals; anything else is refused."""

    _allowed = _safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None


def _load_pickle(path: Path) -> dict[str, Any]:
    """Load a pickled dict with :class:`_RestrictedUnpickler`; bytes keys are decoded to str."""
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: refusing to load untrusted pickle: {e}") from e
    except Exception as e:  # truncated/garbage pickles raise many exception types
        raise DataError(f"{path}: cannot unpickle (corrupt or truncated?): {type(e).__name__}: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR batch -> (uint8 (n, 3, 32, 32), int64 (n,))."""
    d = _load_pickle(path)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: expected keys 'data' and 'labels', found {sorted(map(str, d))}")
    try:
        data, labels = np.asarray(d["data"]), np.asarray(d["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: malformed 'data'/'labels': {e}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 data of shape (N, 3072), found {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: found {data.shape[0]} images but labels of shape {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: Path, name: str, split: str) -> ImageSet:
    for d in (root / "cifar-10-batches-py", root):
        if (d / "test_batch").is_file() or (d / "data_batch_1").is_file():
            files = [d / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [d / "test_batch"]
            missing = [str(p) for p in files if not p.is_file()]
            if missing:
                raise DataError(f"cifar10: missing batch file(s) {', '.join(missing)}")
            batches = [_cifar_batch(p) for p in files]
            classes = CIFAR10_CLASSES
            if (d / "batches.meta").is_file():
                names = _load_pickle(d / "batches.meta").get("label_names")
                if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
                    raise DataError(f"{d / 'batches.meta'}: expected a list 'label_names', found {type(names).__name__}")
                classes = [n.decode() if isinstance(n, bytes) else n for n in names]
            x = u8_to_float(np.concatenate([b[0] for b in batches]))
            return finish(x, np.concatenate([b[1] for b in batches]), classes, f"{name}/{split}", d)
    if (root / split).is_dir():
        return _load_image_folder(root / split, f"{name}/{split}")
    raise DataError(
        f"cifar10: expected pickle batches in {root / 'cifar-10-batches-py'} (or {root}) "
        f"or an image folder {root / split}/<class>/*.png|jpg; found neither"
    )


# ----------------------------------------------------------------------------- image folders

def _cache_dir() -> Path:
    return Path(os.environ.get("ZSDB3KD_CACHE") or Path.home() / ".cache" / "zsdb3kd").expanduser()


def _scan_folder(base: Path) -> tuple[list[str], list[str], np.ndarray, str]:
    """List ``base/<class>/<image>`` -> (classes, file paths, int64 labels, cache key)."""
    classes = sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{base}: expected class subfolders <class>/<image files>, found none")
    key = hashlib.sha256(f"{CACHE_VERSION}\n{base.resolve()}\n".encode())
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        with os.scandir(base / cls) as it:
            entries = sorted((e for e in it if e.is_file() and not e.name.startswith(".")
                              and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS), key=lambda e: e.name)
        for e in entries:
            st = e.stat()
            key.update(f"{cls}/{e.name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            paths.append(e.path)
            labels.append(label)
    if not paths:
        raise DataError(f"{base}: expected image files ({', '.join(sorted(IMAGE_EXTS))}) in {base}/<class>/, found none")
    return classes, paths, np.asarray(labels, dtype=np.int64), key.hexdigest()


def _decode_image(path: str) -> np.ndarray:
    """Decode one image -> uint8 (H, W) for grayscale modes, else (H, W, 3) RGB."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"))
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise DataError(f"{path}: cannot decode image: {type(e).__name__}: {e}") from e


def _decode_all(paths: list[str]) -> np.ndarray:
    """Decode images with a thread pool -> uint8 (N, C, H, W); C = 1 if all are grayscale else 3."""
    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        arrays = list(pool.map(_decode_image, paths, chunksize=64))
    sizes = Counter(a.shape[:2] for a in arrays)
    if len(sizes) > 1:
        (h, w), n = sizes.most_common(1)[0]
        bad = next(i for i, a in enumerate(arrays) if a.shape[:2] != (h, w))
        bh, bw = arrays[bad].shape[:2]
        raise DataError(f"{paths[bad]}: all images must have the same size; expected {w}x{h} "
                        f"(like {n} files), found {bw}x{bh}; sizes seen: {sorted(sizes)}")
    if all(a.ndim == 2 for a in arrays):
        return np.stack(arrays)[:, None]
    h, w = arrays[0].shape[:2]
    rgb = np.stack([a if a.ndim == 3 else np.broadcast_to(a[..., None], (h, w, 3)) for a in arrays])
    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2))


def _cache_read(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            x, y, classes = z["x"], z["y"], [str(c) for c in z["classes"]]
    except FileNotFoundError:
        return None
    except Exception as e:  # a broken cache entry is rebuilt, never fatal
        log.warning("ignoring unreadable cache file %s: %s", path, e)
        return None
    if x.dtype != np.uint8 or x.ndim != 4 or y.shape != (x.shape[0],):
        log.warning("ignoring malformed cache file %s", path)
        return None
    return x, y, classes


def _cache_write(path: Path, x: np.ndarray, y: np.ndarray, classes: list[str]) -> None:
    try:
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, x=x, y=y, classes=np.asarray(classes, dtype=str))
    except OSError as e:
        log.warning("could not write dataset cache %s: %s", path, e)


def _load_image_folder(base: Path, name: str) -> ImageSet:
    """``base/<class>/<image>`` -> ImageSet, via the on-disk uint8 cache when its key matches."""
    try:
        classes, paths, labels, key = _scan_folder(base)
    except OSError as e:
        raise DataError(f"{base}: cannot list image folder: {e}") from e
    cache_file = _cache_dir() / f"folder-{key}.npz"
    cached = _cache_read(cache_file)
    if cached is not None and len(cached[1]) == len(paths) and cached[2] == classes:
        log.debug("dataset cache hit: %s", cache_file)
        x_u8, labels = cached[0], cached[1]
    else:
        x_u8 = _decode_all(paths)
        _cache_write(cache_file, x_u8, labels, classes)
    return finish(u8_to_float(x_u8), labels, classes, name, base)


def _folder_base(root: Path, split: str) -> Path:
    if (root / split).is_dir():
        return root / split
    other = [s for s in SPLITS if (root / s).is_dir()]
    if other:
        raise DataError(f"{root}: expected split folder {root / split}, found only {', '.join(other)}")
    return root


def _load_folder(root: Path, name: str, split: str) -> ImageSet:
    return _load_image_folder(_folder_base(root, split), f"{name}/{split}")


def _peek_folder(root: Path, split: str) -> tuple[int | None, int, int]:
    """``(C, H, W)`` of a folder split from its first image alone: every image has its size;
    ``C`` is 3 when that image is in colour and unknown (``None``) when it is grey, since
    one colour image elsewhere makes the whole set colour."""
    base = _folder_base(root, split)
    for cls in sorted(e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith(".")):
        first = sorted(e.path for e in os.scandir(base / cls) if e.is_file() and not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)
        if first:
            a = _decode_image(first[0])
            return (3 if a.ndim == 3 else None), int(a.shape[0]), int(a.shape[1])
    raise DataError(f"{base}: expected image files in {base}/<class>/, found none")


# ----------------------------------------------------------------------------- npz

def _npz_layout(shape: tuple[int, ...], path: Path) -> str:
    """How an x of ``shape`` holds its images: ``"nhw"``, ``"nchw"`` or ``"nhwc"``."""
    if len(shape) == 3:
        return "nhw"
    if len(shape) == 4 and shape[1] not in (1, 3) and shape[-1] in (1, 3):
        return "nhwc"
    if len(shape) == 4 and shape[1] in (1, 3):
        return "nchw"
    raise DataError(f"{path}: expected x of shape (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {{1, 3}}, "
                    f"found {tuple(shape)}")


def _npz_chw(shape: tuple[int, ...], path: Path) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images in an x of ``shape``."""
    layout = _npz_layout(shape, path)
    if layout == "nhw":
        return 1, shape[1], shape[2]
    if layout == "nhwc":
        return shape[3], shape[1], shape[2]
    return shape[1], shape[2], shape[3]


def _npz_images(x: np.ndarray, path: Path, pixel_scale: float | None) -> torch.Tensor:
    """x of shape (N, H, W), (N, C, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1].

    Values must already lie in [0, 1], or ``pixel_scale`` says what to divide them by (255
    for 8-bit images, 16 for scikit-learn's digits): nothing is scaled unless asked."""
    layout = _npz_layout(x.shape, path)
    if layout == "nhw":
        x = x[:, None]
    elif layout == "nhwc":
        x = x.transpose(0, 3, 1, 2)
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise DataError(f"{path}: expected x of an integer or float dtype, found {x.dtype}")
    xf = np.ascontiguousarray(x, dtype=np.float32)
    lo, hi = (float(xf.min()), float(xf.max())) if xf.size else (0.0, 0.0)
    if pixel_scale is not None:
        xf /= np.float32(pixel_scale)
        if xf.size and not (xf.min() >= 0.0 and xf.max() <= 1.0):  # also catches NaN
            raise DataError(f"{path}: x / pixel_scale must lie in [0, 1]; x ranges over [{lo:g}, {hi:g}] and "
                            f"pixel_scale is {pixel_scale:g}")
    elif xf.size and not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        guess = 255 if hi > 16 else 16 if hi > 1 else None
        hint = f" (e.g. --pixel-scale {guess:g} if {guess:g} is the largest value it can take)" if guess else ""
        raise DataError(f"{path}: x ({x.dtype}) ranges over [{lo:g}, {hi:g}], not [0, 1]; say what to divide "
                        f"it by with --pixel-scale (pixel_scale in [data]){hint}")
    return torch.from_numpy(xf)


def _npz_path(root: Path, split: str) -> Path:
    if root.is_dir():
        path = root / f"{split}.npz"
        if not path.is_file():
            raise DataError(f"npz: expected {path} (directory with train.npz/test.npz), not found")
        return path
    if split != "train":
        raise DataError(f"npz: a single file ({root}) is the train split; for split={split!r} pass a directory "
                        f"containing {split}.npz")
    return root


def _peek_npz(root: Path, split: str) -> tuple[int, int, int]:
    """``(C, H, W)`` of an npz split from the header of its ``x`` array alone (no pixel read)."""
    path = _npz_path(root, split)
    try:
        with zipfile.ZipFile(path) as z, z.open("x.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape = read(f)[0]
    except KeyError:
        raise DataError(f"{path}: expected arrays x and y, x is missing") from None
    except Exception as e:  # BadZipFile, OSError, ValueError
        raise DataError(f"{path}: cannot read npz (corrupt, truncated or pickled objects?): {e}") from e
    return _npz_chw(tuple(shape), path)


def _load_npz(root: Path, name: str, split: str, pixel_scale: float | None = None) -> ImageSet:
    path = _npz_path(root, split)
    try:  # open the file ourselves: np.load leaks its handle when the zip is corrupt
        with open(path, "rb") as f:
            z = np.load(f, allow_pickle=False)
            if not hasattr(z, "files"):
                raise DataError(f"{path}: expected an .npz archive with arrays x and y, found a single .npy array")
            missing = {"x", "y"} - set(z.files)
            if missing:
                raise DataError(f"{path}: expected arrays x and y, missing {sorted(missing)}; found {z.files}")
            x, y = z["x"], z["y"]
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
    except DataError:
        raise
    except Exception as e:  # BadZipFile, OSError, ValueError (object arrays), EOFError...
        raise DataError(f"{path}: cannot read npz (corrupt, truncated or pickled objects?): {e}") from e
    return finish(_npz_images(x, path, pixel_scale), y, classes, f"{name}/{split}", path)




def peek_shape(name: str, root: Path, split: str) -> tuple[int | None, int, int] | None:
    """``(C, H, W)`` of a split's images known without reading its pixels (``C`` may be
    ``None``: see :func:`_peek_folder`); ``None`` where the format cannot tell."""
    if name == "npz":
        return _peek_npz(root, split)
    if name == "folder":
        return _peek_folder(root, split)
    return {"mnist": (1, 28, 28), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}.get(name)


LOADERS: dict[str, Callable[[Path, str, str], ImageSet]] = {
    "mnist": _load_idx, "fashion-mnist": _load_idx, "cifar10": _load_cifar10, "folder": _load_folder, "npz": _load_npz,
}

