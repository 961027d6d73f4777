"""Datasets with fixed-constant preprocessing and a public input-clipping radius.

Preprocessing uses constants only (pixels / 255, or / 16 for digits): standardising with
the dataset's own mean and std would leak information about the private data. The input
radius R (``DatasetInfo.input_radius``) is a fixed constant per dataset as well, chosen
once from the image format, never computed from the data at run time.

* ``digits``: scikit-learn's 8x8 digits (1,797 images, ships with scikit-learn): offline,
  the default. A fixed, seeded 80/20 split.
* ``mnist``, ``fashion_mnist``, ``cifar10``: TensorFlow Datasets (needs internet once).
* a path to an ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images).
"""

from __future__ import annotations

import functools
import math
import os
import socket
import zipfile
from dataclasses import dataclass

import numpy as np

TFDS_DATASETS = ("mnist", "fashion_mnist", "cifar10")
DATASETS = ("digits",) + TFDS_DATASETS
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Radius as a fraction of sqrt(number of pixel values), the norm of an all-white image.
# Images are then mostly clipped to a common norm; the loss temperature sets the scale.
RADIUS_FRACTION = 0.2


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    input_shape: tuple
    num_classes: int
    input_radius: float
    num_train: int
    num_test: int
    preprocessing: str


Split = tuple  # (x: float32 array (N, H, W, C), y: int64 array (N,))


@functools.lru_cache(maxsize=1)
def internet_available(timeout: float = 2.0) -> bool:
    """Whether TensorFlow Datasets' storage answers (offline, tfds.load retries for minutes)."""
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def available() -> list[str]:
    """Dataset names that load here: digits always, TFDS ones when online."""
    return list(DATASETS) if internet_available() else ["digits"]


def load_or_digits(name: str) -> tuple[Split, Split, DatasetInfo]:
    """``load(name)`` when online, else the offline digits (with a printed notice)."""
    if name == "digits" or internet_available():
        return load(name)
    print(f"{name} needs internet to download; using scikit-learn's digits instead.")
    return load("digits")


def default_radius(input_shape: tuple) -> float:
    """R = 0.2 * sqrt(d): a function of the image format only, not of the data."""
    return round(RADIUS_FRACTION * math.sqrt(math.prod(input_shape)), 2)


def load(name: str = "digits", data_dir: str | None = None) -> tuple[Split, Split, DatasetInfo]:
    """(train, test, info) for a dataset name or a path to an .npz file."""
    if name == "digits":
        return load_digits()
    if name in TFDS_DATASETS:
        return load_tfds(name, data_dir)
    if name.endswith(".npz") or os.path.exists(name):
        return load_npz(name)
    raise ValueError(f"Unknown dataset {name!r}: use one of {DATASETS} or a path to an .npz file.")


def _finish(name: str, train: Split, test: Split, scale: float, preprocessing: str, num_classes: int | None = None):
    (x_train, y_train), (x_test, y_test) = train, test
    x_train, x_test = (_as_images(x) / np.float32(scale) for x in (x_train, x_test))
    y_train, y_test = _as_labels(y_train, "y_train"), _as_labels(y_test, "y_test")
    num_classes = num_classes or int(y_train.max()) + 1
    if y_test.max() >= num_classes:
        raise ValueError(f"{name}: y_test holds label {y_test.max()} but y_train only has classes 0..{num_classes - 1}.")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{name}: train images {x_train.shape[1:]} and test images {x_test.shape[1:]} differ in shape.")
    shape = tuple(x_train.shape[1:])
    info = DatasetInfo(name, shape, num_classes, default_radius(shape), len(x_train), len(x_test), preprocessing)
    return (x_train, y_train), (x_test, y_test), info


def _as_images(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"Images must have shape (N, H, W) or (N, H, W, C), got {x.shape}.")
    return x.astype(np.float32)


def _as_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class labels, got dtype {y.dtype}.")
    if len(y) and y.min() < 0:
        raise ValueError(f"{name} holds a negative label ({y.min()}): labels must be 0, 1, ..., K-1.")
    return y.astype(np.int64)


def load_digits(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's 8x8 digits, pixels / 16, a fixed seeded split."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    cut = int(round(len(order) * (1 - test_fraction)))
    x, y = digits.images.astype(np.float32), digits.target
    train, test = (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])
    return _finish("digits", train, test, 16.0, "pixels / 16", num_classes=10)


def load_tfds(name: str, data_dir: str | None = None):
    """MNIST, Fashion-MNIST or CIFAR-10 from TensorFlow Datasets, pixels / 255."""
    import tensorflow_datasets as tfds

    splits = tfds.load(name, split=["train", "test"], batch_size=-1, as_supervised=True, data_dir=data_dir)
    (x_train, y_train), (x_test, y_test) = tfds.as_numpy(splits)
    num_classes = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}[name]
    return _finish(name, (x_train, y_train), (x_test, y_test), 255.0, "pixels / 255", num_classes)


def load_npz(path: str):
    """An .npz with uint8 images x_train, x_test and integer labels y_train, y_test."""
    if not os.path.isfile(path):
        raise ValueError(f"No such .npz file: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path} is not a readable .npz file ({error}).") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array: an .npz dataset needs the arrays {list(NPZ_KEYS)}.")
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise ValueError(f"{path} lacks {missing}: an .npz dataset needs the arrays {list(NPZ_KEYS)}.")
        arrays = {key: archive[key] for key in NPZ_KEYS}
    for key in ("x_train", "x_test"):
        if arrays[key].dtype != np.uint8:
            raise ValueError(f"{path}: {key} must be uint8 images (0..255), got dtype {arrays[key].dtype}.")
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise ValueError(f"{path}: x_{split} and y_{split} hold different numbers of examples.")
    train = (arrays["x_train"], arrays["y_train"])
    test = (arrays["x_test"], arrays["y_test"])
    return _finish(os.path.basename(path), train, test, 255.0, "pixels / 255")
