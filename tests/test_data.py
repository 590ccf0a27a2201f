"""Tests for zsdb3kd.data: loaders on synthetic files, safety of the pickle path, splitting."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsdb3kd.data import formats as data
from zsdb3kd.data import (
    DATASETS,
    DEFAULT_ROOTS,
    DataError,
    ImageSet,
    dataset_fingerprint,
    load_dataset,
    train_val_split,
)

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared/data/mnist"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("ZSDB3KD_CACHE", str(cache))
    return cache


# ----------------------------------------------------------------------------- helpers

def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx_set(d: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for stem, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(arr)
        if gz:
            (d / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (d / stem).write_bytes(raw)


def rand_mnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_png_folder(base: Path, classes: dict[str, int], size=(8, 6), mode: str = "L", seed: int = 0) -> dict[str, np.ndarray]:
    """Write ``count`` random PNGs per class; returns {path: pixel array}."""
    rng = np.random.default_rng(seed)
    out = {}
    for cls, count in classes.items():
        (base / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            p = base / cls / f"img{i:03d}.png"
            Image.fromarray(arr, mode).save(p)
            out[str(p)] = arr
    return out


# ----------------------------------------------------------------------------- ImageSet

def test_imageset_basics_and_subset() -> None:
    x = torch.rand(5, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 1, 0])
    ds = ImageSet(x, y, ["a", "b", "c"], "toy/train")
    assert len(ds) == 5 and ds.shape == (3, 4, 4) and ds.num_classes == 3
    sub = ds.subset(torch.tensor([4, 1]))
    assert torch.equal(sub.x, x[[4, 1]]) and sub.y.tolist() == [0, 1]
    assert sub.name.startswith("toy/train") and sub.name != ds.name and sub.classes == ds.classes
    assert ds.subset([0, 2]).y.tolist() == [0, 2]
    assert ds.subset(torch.tensor([True, False, False, True, False])).y.tolist() == [0, 1]
    with pytest.raises(ValueError):
        ImageSet(x, y.float(), ["a"], "bad")


def test_fingerprint_changes_with_content() -> None:
    ds = ImageSet(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), ["a", "b"], "t")
    same = ImageSet(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), ["a", "b"], "other")
    fp = dataset_fingerprint(ds)
    assert len(fp) == 64 and fp == dataset_fingerprint(same)
    x2 = ds.x.clone()
    x2[0, 0, 0, 0] = 1e-3
    assert dataset_fingerprint(ImageSet(x2, ds.y, ds.classes, "t")) != fp
    assert dataset_fingerprint(ImageSet(ds.x, torch.tensor([1, 0]), ds.classes, "t")) != fp


# ----------------------------------------------------------------------------- arguments

def test_unknown_name_and_split() -> None:
    with pytest.raises(DataError) as e:
        load_dataset("imagenet", "/nonexistent")
    assert all(n in str(e.value) for n in DATASETS)
    with pytest.raises(DataError, match="split"):
        load_dataset("mnist", "/nonexistent", split="val")
    assert issubclass(DataError, ValueError)


def test_missing_roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("mnist", None)
    missing = tmp_path / "nope"
    monkeypatch.setitem(DEFAULT_ROOTS, "fashion-mnist", str(missing))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", None)
    assert str(missing) in str(e.value) and "apt-get install dataset-fashion-mnist" in str(e.value)
    with pytest.raises(DataError, match=str(missing)):
        load_dataset("mnist", missing)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("mnist", tmp_path / "empty", split="test")


# ----------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    imgs, labels = rand_mnist(12)
    write_idx_set(tmp_path, "t10k", imgs, labels, gz=gz)
    ds = load_dataset("mnist", tmp_path, split="test")
    assert ds.x.dtype == torch.float32 and ds.x.shape == (12, 1, 28, 28)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == labels.tolist()
    assert np.array_equal((ds.x[:, 0] * 255).round().to(torch.uint8).numpy(), imgs)
    assert ds.classes == [str(i) for i in range(10)] and ds.name == "mnist/test"


def test_torchvision_raw_layout_and_fashion_classes(tmp_path: Path) -> None:
    imgs, labels = rand_mnist(7, seed=1)
    write_idx_set(tmp_path / "FashionMNIST" / "raw", "train", imgs, labels)
    ds = load_dataset("fashion-mnist", tmp_path, split="train")
    assert ds.y.tolist() == labels.tolist() and len(ds) == 7
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and ds.num_classes == 10
    write_idx_set(tmp_path / "MNIST" / "raw", "train", imgs, labels, gz=False)
    assert torch.equal(load_dataset("mnist", tmp_path).x, ds.x)


def test_idx_corruption(tmp_path: Path) -> None:
    imgs, labels = rand_mnist(10)
    write_idx_set(tmp_path, "train", imgs, labels)
    img_file = tmp_path / "train-images-idx3-ubyte.gz"
    good = img_file.read_bytes()
    img_file.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path)
    img_file.write_bytes(gzip.compress(idx_bytes(imgs)[:-5]))  # valid gzip, short payload
    with pytest.raises(DataError, match="bytes"):
        load_dataset("mnist", tmp_path)
    img_file.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + idx_bytes(imgs)[4:]))  # wrong ndim in magic
    with pytest.raises(DataError, match="magic"):
        load_dataset("mnist", tmp_path)
    img_file.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=str(img_file)):
        load_dataset("mnist", tmp_path)
    write_idx_set(tmp_path, "train", imgs, labels[:9])  # count mismatch
    with pytest.raises(DataError, match="10 images but 9 labels"):
        load_dataset("mnist", tmp_path)
    bad_labels = labels.copy()
    bad_labels[3] = 10
    write_idx_set(tmp_path, "train", imgs, bad_labels)
    with pytest.raises(DataError, match="labels must lie in"):
        load_dataset("mnist", tmp_path)


# ----------------------------------------------------------------------------- CIFAR pickles

def write_cifar(d: Path, n: int = 4, protocol: int = pickle.DEFAULT_PROTOCOL, seed: int = 0) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        (d / fname).write_bytes(pickle.dumps({b"batch_label": b"x", b"data": x, b"labels": y}, protocol=protocol))
        out[fname] = (x, y)
    meta = {b"label_names": [c.encode() for c in data.CIFAR10_CLASSES], b"num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))
    return out


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_pickle_batches(tmp_path: Path, protocol: int) -> None:
    written = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    test = load_dataset("cifar10", tmp_path, split="test")
    x, y = written["test_batch"]
    assert test.x.shape == (4, 3, 32, 32) and test.y.tolist() == y
    assert np.array_equal((test.x * 255).round().to(torch.uint8).numpy(), x.reshape(-1, 3, 32, 32))
    assert test.classes == data.CIFAR10_CLASSES
    train = load_dataset("cifar10", tmp_path / "cifar-10-batches-py", split="train")  # files directly in root
    assert len(train) == 20 and train.y[:4].tolist() == written["data_batch_1"][1]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar(d)
    marker = tmp_path / "pwned"
    (d / "test_batch").write_bytes(pickle.dumps({"data": _Evil(marker), "labels": [0]}))
    with pytest.raises(DataError, match="test_batch") as e:
        load_dataset("cifar10", tmp_path, split="test")
    assert "system" in str(e.value)
    assert not marker.exists()
    (d / "test_batch").write_bytes(pickle.dumps({"data": _EvalEvil(), "labels": [0]}))
    with pytest.raises(DataError, match="eval"):
        load_dataset("cifar10", tmp_path, split="test")
    # codecs.encode is only allowed for latin-1 byte strings
    payload = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x04\x00\x00\x00zlib\x86R."
    (d / "test_batch").write_bytes(payload)
    with pytest.raises(DataError, match="zlib"):
        load_dataset("cifar10", tmp_path, split="test")


def test_cifar_corrupt_and_missing(tmp_path: Path) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar(d)
    good = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(good[:100])
    with pytest.raises(DataError, match="test_batch"):
        load_dataset("cifar10", tmp_path, split="test")
    (d / "test_batch").write_bytes(pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    with pytest.raises(DataError, match="3072"):
        load_dataset("cifar10", tmp_path, split="test")
    (d / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, split="train")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", tmp_path / "elsewhere")


def test_cifar_image_folder(tmp_path: Path) -> None:
    pixels = write_png_folder(tmp_path / "test", {"cat": 2, "airplane": 3}, size=(5, 4), mode="RGB")
    ds = load_dataset("cifar10", tmp_path, split="test")
    assert ds.classes == ["airplane", "cat"] and ds.y.tolist() == [0, 0, 0, 1, 1]
    assert ds.x.shape == (5, 3, 4, 5)
    first = pixels[str(tmp_path / "test" / "airplane" / "img000.png")]
    assert np.array_equal((ds.x[0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), first)


# ----------------------------------------------------------------------------- folders + cache

def test_folder_grayscale_with_split_dirs(tmp_path: Path) -> None:
    pixels = write_png_folder(tmp_path / "train", {"b": 2, "a": 1}, size=(6, 5), mode="L")
    (tmp_path / "train" / "a" / "notes.txt").write_text("ignored")
    ds = load_dataset("folder", tmp_path, split="train")
    assert ds.shape == (1, 5, 6) and ds.classes == ["a", "b"] and ds.y.tolist() == [0, 1, 1]
    expected = np.stack([pixels[str(tmp_path / "train" / c / f"img{i:03d}.png")] for c, i in [("a", 0), ("b", 0), ("b", 1)]])
    assert np.array_equal((ds.x[:, 0] * 255).round().to(torch.uint8).numpy(), expected)
    with pytest.raises(DataError, match="test"):
        load_dataset("folder", tmp_path, split="test")


def test_folder_without_split_mixed_modes(tmp_path: Path) -> None:
    write_png_folder(tmp_path, {"gray": 2}, size=(4, 4), mode="L")
    rgb = write_png_folder(tmp_path, {"rgb": 1}, size=(4, 4), mode="RGB", seed=3)
    ds = load_dataset("folder", tmp_path)
    assert ds.shape == (3, 4, 4) and ds.y.tolist() == [0, 0, 1]
    assert torch.equal(ds.x[0, 0], ds.x[0, 1]) and torch.equal(ds.x[0, 0], ds.x[0, 2])  # gray replicated
    assert np.array_equal((ds.x[2] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), next(iter(rgb.values())))


def test_folder_size_mismatch_and_corrupt(tmp_path: Path) -> None:
    write_png_folder(tmp_path, {"a": 3}, size=(4, 4))
    odd = tmp_path / "a" / "zzz.png"
    Image.fromarray(np.zeros((5, 7), np.uint8), "L").save(odd)
    with pytest.raises(DataError) as e:
        load_dataset("folder", tmp_path)
    assert str(odd) in str(e.value) and "4x4" in str(e.value) and "7x5" in str(e.value)
    odd.write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match="zzz.png"):
        load_dataset("folder", tmp_path)
    with pytest.raises(DataError, match="class subfolders"):
        load_dataset("folder", tmp_path / "a")


def test_folder_cache_hit_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           _isolated_cache: Path) -> None:
    root = tmp_path / "imgs"
    write_png_folder(root, {"x": 3, "y": 2}, size=(6, 6), mode="RGB")
    first = load_dataset("folder", root)
    cache_files = list(_isolated_cache.glob("folder-*.npz"))
    assert len(cache_files) == 1 and not list(_isolated_cache.glob("*.tmp"))

    def boom(path: str) -> np.ndarray:
        raise AssertionError("decoded despite cache")

    monkeypatch.setattr(data, "_decode_image", boom)
    second = load_dataset("folder", root)
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y) and first.classes == second.classes
    assert dataset_fingerprint(first) == dataset_fingerprint(second)
    # adding a file changes the key -> decode again (and our boom fires)
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / "y" / "new.png")
    with pytest.raises(AssertionError, match="despite cache"):
        load_dataset("folder", root)
    monkeypatch.undo()
    monkeypatch.setenv("ZSDB3KD_CACHE", str(_isolated_cache))
    third = load_dataset("folder", root)
    assert len(third) == 6 and len(list(_isolated_cache.glob("folder-*.npz"))) == 2
    # a corrupt cache entry is ignored and rebuilt
    for f in _isolated_cache.glob("folder-*.npz"):
        f.write_bytes(f.read_bytes()[:200])  # truncated zip
    assert torch.equal(load_dataset("folder", root).x, third.x)


# ----------------------------------------------------------------------------- npz

def test_npz_variants(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (6, 5, 4, 3), dtype=np.uint8)  # NHWC
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "hwc.npz", x=u8, y=y, classes=np.array(["r", "g", "b"]))
    with pytest.raises(DataError, match="--pixel-scale 255"):  # 8-bit values are not scaled unless asked
        load_dataset("npz", tmp_path / "hwc.npz")
    ds = load_dataset("npz", tmp_path / "hwc.npz", pixel_scale=255)
    assert ds.shape == (3, 5, 4) and ds.classes == ["r", "g", "b"] and ds.y.tolist() == y.tolist()
    assert np.array_equal((ds.x * 255).round().to(torch.uint8).numpy(), u8.transpose(0, 3, 1, 2))

    fl = rng.random((6, 7, 7)).astype(np.float64)  # NHW float
    d = tmp_path / "dir"
    d.mkdir()
    np.savez(d / "train.npz", x=fl, y=y)
    np.savez(d / "test.npz", x=fl[:2, None].astype(np.float32), y=y[:2])  # NCHW
    tr, te = load_dataset("npz", d, "train"), load_dataset("npz", d, "test")
    assert tr.x.dtype == torch.float32 and tr.shape == (1, 7, 7) and tr.classes == ["0", "1", "2"]
    assert torch.allclose(tr.x[:, 0], torch.from_numpy(fl).float()) and te.x.shape == (2, 1, 7, 7)


@pytest.mark.parametrize("x, match", [
    (np.full((3, 4, 4), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((3, 4, 4), np.nan, np.float32), r"\[0, 1\]"),
    (np.zeros((3, 4, 4), np.complex64), "dtype"),
    (np.zeros((3, 5, 4, 4), np.uint8), "shape"),
    (np.zeros((3, 4), np.uint8), "shape"),
])
def test_npz_bad_x(tmp_path: Path, x: np.ndarray, match: str) -> None:
    np.savez(tmp_path / "d.npz", x=x, y=np.zeros(len(x), np.int64))
    with pytest.raises(DataError, match=match):
        load_dataset("npz", tmp_path / "d.npz")


def test_npz_values_outside_unit_range_need_an_explicit_scale(tmp_path: Path) -> None:
    """scikit-learn's digits are uint8 in 0..16: dividing by 255 would silently ruin them."""
    x = np.random.default_rng(0).integers(0, 17, (5, 8, 8)).astype(np.uint8)
    x[0, 0, 0] = 16
    np.savez(tmp_path / "digits.npz", x=x, y=np.arange(5))
    with pytest.raises(DataError, match=r"ranges over \[0, 16\].*--pixel-scale 16"):
        load_dataset("npz", tmp_path / "digits.npz")
    ds = load_dataset("npz", tmp_path / "digits.npz", pixel_scale=16)
    assert float(ds.x.max()) == 1.0 and torch.equal(ds.x * 16, torch.from_numpy(x[:, None]).float())
    with pytest.raises(DataError, match="pixel_scale"):
        load_dataset("npz", tmp_path / "digits.npz", pixel_scale=8)  # 16 / 8 > 1
    with pytest.raises(DataError, match="npz data only"):
        load_dataset("mnist", tmp_path, pixel_scale=255)


def test_npz_structure_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(DataError, match="missing"):
        load_dataset("npz", p)
    np.savez(p, x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1]))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_dataset("npz", p)
    np.savez(p, x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 5]), classes=np.array(["a", "b"]))
    with pytest.raises(DataError, match="labels must lie"):
        load_dataset("npz", p)
    np.savez(p, x=np.zeros((2, 4, 4), np.uint8), y=np.array([0, 1]), obj=np.array([{}], dtype=object))
    assert len(load_dataset("npz", p)) == 2  # unused object array is never unpickled
    np.savez(p, x=np.zeros((2, 4, 4), np.uint8), y=np.array([{"a": 1}, 2], dtype=object))
    with pytest.raises(DataError, match=str(p)):
        load_dataset("npz", p)
    np.save(tmp_path / "single.npy", np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="single .npy"):
        load_dataset("npz", tmp_path / "single.npy")
    p.write_bytes(p.read_bytes()[:50])
    with pytest.raises(DataError, match=str(p)):
        load_dataset("npz", p)
    with pytest.raises(DataError, match="test.npz"):
        load_dataset("npz", tmp_path, split="test")
    with pytest.raises(DataError, match="directory"):
        load_dataset("npz", p, split="test")


# ----------------------------------------------------------------------------- train_val_split

def test_split_disjoint_covering_stratified() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(1))]
    tr, va = train_val_split(labels, 0.2, seed=0)
    assert tr.dtype == torch.int64 and va.dtype == torch.int64
    assert len(va) == 20 and len(tr) == 80
    assert torch.equal(torch.cat([tr, va]).sort().values, torch.arange(100))
    assert torch.equal(tr, tr.sort().values) and torch.equal(va, va.sort().values)
    assert torch.bincount(labels[va], minlength=3).tolist() == [10, 6, 4]
    tr2, va2 = train_val_split(labels, 20, seed=0)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    _, va3 = train_val_split(labels, 20, seed=1)
    assert not torch.equal(va, va3) and torch.bincount(labels[va3], minlength=3).tolist() == [10, 6, 4]


def test_split_every_class_represented() -> None:
    labels = torch.tensor([0] * 97 + [1] * 2 + [2] * 1 + [3] * 3)  # 103 samples, tiny classes
    _, va = train_val_split(labels, 5, seed=3)
    counts = torch.bincount(labels[va], minlength=4)
    assert len(va) == 5 and counts[0] >= 1 and counts[1] == 1 and counts[3] == 1
    _, va_small = train_val_split(labels, 1)
    assert len(va_small) == 1
    tr0, va0 = train_val_split(labels, 0)
    assert len(va0) == 0 and torch.equal(tr0, torch.arange(103))
    # non-contiguous label values are fine
    tr, va = train_val_split(torch.tensor([7, 7, 7, 7, -1, -1, -1, -1]), 0.5)
    assert sorted(torch.tensor([7, 7, 7, 7, -1, -1, -1, -1])[va].tolist()) == [-1, -1, 7, 7]


@pytest.mark.parametrize("val_size", [-1, 10, 0.0, 1.0, 1.5, True, "0.1", None])
def test_split_validates_val_size(val_size) -> None:
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(torch.arange(10) % 2, val_size)


def test_split_validates_labels() -> None:
    with pytest.raises(ValueError, match="1-D integer"):
        train_val_split(torch.rand(10), 0.1)
    with pytest.raises(ValueError, match="at least 2"):
        train_val_split(torch.tensor([1]), 0.5)


# ----------------------------------------------------------------------------- real data (when present)

def _check_real(ds: ImageSet, classes0: str) -> None:
    assert ds.x.shape == (10000, 1, 28, 28) and ds.x.dtype == torch.float32
    assert float(ds.x.min()) >= 0.0 and float(ds.x.max()) <= 1.0 and float(ds.x.max()) > 0.5
    assert ds.num_classes == 10 and ds.classes[0] == classes0
    assert torch.bincount(ds.y, minlength=10).min() > 500


def test_real_fashion_mnist() -> None:
    if not Path(DEFAULT_ROOTS["fashion-mnist"]).exists():
        pytest.skip("dataset-fashion-mnist not installed")
    _check_real(load_dataset("fashion-mnist", split="test"), "T-shirt/top")


def test_real_mnist() -> None:
    if not SHARED_MNIST.exists():
        pytest.skip(f"{SHARED_MNIST} not present")
    _check_real(load_dataset("mnist", SHARED_MNIST, split="test"), "0")


SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpg"


def test_real_cifar10_image_folder() -> None:
    if not SHARED_CIFAR.exists():
        pytest.skip(f"{SHARED_CIFAR} not present")
    ds = load_dataset("cifar10", SHARED_CIFAR, split="test")
    assert ds.x.shape == (10000, 3, 32, 32) and ds.x.dtype == torch.float32
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(ds.y, minlength=10).tolist() == [1000] * 10
    assert 0.3 < float(ds.x.mean()) < 0.7 and float(ds.x.max()) == 1.0
