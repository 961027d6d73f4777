"""Datasets: fixed-constant preprocessing, a public input radius, clear errors, and fit()
refusing bad arrays without touching the model. TFDS is only ever used under
``tfds.testing.mock_data`` (a real tfds.load hangs ~200 s offline)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import lipdp
import tensorflow as tf
from lipdp import datasets, presets
from lipdp.model import DPParameters

# ------------------------------------------------------------------------- digits
DIGITS_TOTAL = 1797


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def test_digits_shapes_types_and_ranges(digits):
    (x_train, y_train), (x_test, y_test), info = digits
    assert len(x_train) + len(x_test) == DIGITS_TOTAL
    assert len(x_test) == pytest.approx(0.2 * DIGITS_TOTAL, abs=1)
    assert x_train.shape == (len(x_train), 8, 8, 1) and x_test.shape == (len(x_test), 8, 8, 1)
    for x in (x_train, x_test):
        assert x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    assert x_train.max() == 1.0  # 16 / 16: the fixed constant, not a data statistic
    for y, x in ((y_train, x_train), (y_test, x_test)):
        assert np.issubdtype(y.dtype, np.integer)
        assert y.shape == (len(x),)
        assert y.min() >= 0 and y.max() <= 9
    assert set(np.unique(y_train)) == set(range(10))


def test_digits_info(digits):
    (x_train, _), (x_test, _), info = digits
    assert info.name == "digits"
    assert info.input_shape == (8, 8, 1)
    assert info.num_classes == 10
    assert info.num_train == len(x_train) and info.num_test == len(x_test)
    assert "16" in info.preprocessing
    # The documented radius: 0.2 * sqrt(number of pixel values) = 0.2 * sqrt(64).
    assert info.input_radius == pytest.approx(0.2 * math.sqrt(64)) == 1.6


def test_digits_split_is_fixed():
    (a_x, a_y), (a_xt, a_yt), a_info = datasets.load("digits")
    (b_x, b_y), (b_xt, b_yt), b_info = datasets.load("digits")
    np.testing.assert_array_equal(a_x, b_x)
    np.testing.assert_array_equal(a_y, b_y)
    np.testing.assert_array_equal(a_xt, b_xt)
    np.testing.assert_array_equal(a_yt, b_yt)
    assert a_info == b_info


def test_digits_is_sklearn_digits_divided_by_16(digits):
    """All 1,797 images, each once, pixel / 16 exactly (no standardisation)."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    (x_train, y_train), (x_test, y_test), _ = digits
    ours = np.concatenate([x_train, x_test]).reshape(DIGITS_TOTAL, 64) * 16
    ours = np.concatenate([ours, np.concatenate([y_train, y_test])[:, None]], axis=1)
    theirs = np.concatenate([raw.images.reshape(DIGITS_TOTAL, 64), raw.target[:, None]], axis=1)
    ours = ours[np.lexsort(ours.T[::-1])]
    theirs = theirs[np.lexsort(theirs.T[::-1])]
    np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------------------- npz
def _write_npz(path, n_train=30, n_test=10, shape=(28, 28), classes=10, seed=0, **overrides):
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, size=(n_train, *shape), dtype=np.uint8),
        "y_train": np.arange(n_train) % classes,
        "x_test": rng.integers(0, 256, size=(n_test, *shape), dtype=np.uint8),
        "y_test": np.arange(n_test) % classes,
    }
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return str(path), arrays


def test_npz_loads(tmp_path):
    path, arrays = _write_npz(tmp_path / "small.npz")
    (x_train, y_train), (x_test, y_test), info = datasets.load(path)
    assert x_train.shape == (30, 28, 28, 1) and x_test.shape == (10, 28, 28, 1)
    assert x_train.dtype == np.float32
    np.testing.assert_allclose(x_train[..., 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(x_test[..., 0], arrays["x_test"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y_train, arrays["y_train"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    assert info.num_classes == 10
    assert info.input_shape == (28, 28, 1)
    assert (info.num_train, info.num_test) == (30, 10)
    assert info.input_radius == pytest.approx(0.2 * 28)


def test_npz_with_channels(tmp_path):
    rng = np.random.default_rng(1)
    path, _ = _write_npz(
        tmp_path / "rgb.npz",
        x_train=rng.integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8),
        x_test=rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8),
    )
    (x_train, _), _, info = datasets.load(path)
    assert x_train.shape == (30, 8, 8, 3)
    assert info.input_radius == pytest.approx(0.2 * math.sqrt(8 * 8 * 3), abs=0.005)


def test_npz_preprocessing_and_radius_do_not_depend_on_the_data(tmp_path):
    """Dark images are not rescaled to [0, 1], and keep the same radius (DESIGN §4)."""
    rng = np.random.default_rng(2)
    dark = rng.integers(0, 60, size=(30, 28, 28), dtype=np.uint8)
    path_dark, _ = _write_npz(tmp_path / "dark.npz", x_train=dark)
    path_full, _ = _write_npz(tmp_path / "full.npz")
    (x_dark, _), _, info_dark = datasets.load(path_dark)
    _, _, info_full = datasets.load(path_full)
    np.testing.assert_allclose(x_dark[..., 0], dark / 255.0, rtol=1e-6)
    assert info_dark.input_radius == info_full.input_radius


def test_npz_missing_arrays_are_named(tmp_path):
    path, _ = _write_npz(tmp_path / "partial.npz", x_test=None, y_test=None)
    with pytest.raises(ValueError) as info:
        datasets.load(path)
    message = str(info.value)
    assert "x_test" in message and "y_test" in message


def test_npz_float_images_rejected(tmp_path):
    rng = np.random.default_rng(3)
    path, _ = _write_npz(tmp_path / "float.npz", x_train=rng.random((30, 28, 28)).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        datasets.load(path)


def test_npz_test_label_beyond_train_classes_rejected(tmp_path):
    path, _ = _write_npz(tmp_path / "labels.npz", y_train=np.arange(30) % 5, y_test=np.array([0, 1, 2, 3, 4, 7, 0, 1, 2, 3]))
    with pytest.raises(ValueError, match="y_test"):
        datasets.load(path)


def test_npz_negative_labels_rejected(tmp_path):
    y_train = np.arange(30) % 10
    y_train[3] = -1
    path, _ = _write_npz(tmp_path / "negative.npz", y_train=y_train)
    with pytest.raises(ValueError, match="negative"):
        datasets.load(path)
    y_test = np.arange(10) % 10
    y_test[0] = -2
    path, _ = _write_npz(tmp_path / "negative_test.npz", y_test=y_test)
    with pytest.raises(ValueError, match="negative"):
        datasets.load(path)


def test_npz_float_labels_rejected(tmp_path):
    path, _ = _write_npz(tmp_path / "float_labels.npz", y_train=(np.arange(30) % 10).astype(np.float32))
    with pytest.raises(ValueError, match="integer"):
        datasets.load(path)


def test_npz_length_mismatch_rejected(tmp_path):
    path, _ = _write_npz(tmp_path / "mismatch.npz", y_train=np.arange(29) % 10)
    with pytest.raises(ValueError, match="x_train"):
        datasets.load(path)


def test_npz_shape_mismatch_rejected(tmp_path):
    rng = np.random.default_rng(4)
    path, _ = _write_npz(tmp_path / "shapes.npz", x_test=rng.integers(0, 256, size=(10, 14, 14), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        datasets.load(path)


def test_missing_npz_file_rejected(tmp_path):
    with pytest.raises(ValueError, match="npz"):
        datasets.load(str(tmp_path / "nowhere.npz"))


def test_truncated_npz_rejected_with_value_error(tmp_path):
    path, _ = _write_npz(tmp_path / "full.npz")
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        datasets.load(str(truncated))


def test_directory_as_dataset_rejected_with_value_error(tmp_path):
    with pytest.raises(ValueError):
        datasets.load(str(tmp_path))


@pytest.mark.parametrize("name", ["nonexistent", "MNIST", "imagenet"])
def test_unknown_dataset_rejected(name):
    with pytest.raises(ValueError, match="Unknown dataset"):
        datasets.load(name)


# --------------------------------------------------------------------------- tfds
def test_tfds_mnist_with_mock_data(tmp_path):
    """The real TFDS code path, offline, on mocked MNIST.

    tfds.testing.mock_data alone (no metadata) leaves the split sizes unknown, so
    tfds.load(batch_size=-1) batches by sys.maxsize and the process aborts
    (std::length_error). With a minimal dataset_info.json giving the split sizes, it works.
    """
    import tensorflow_datasets as tfds

    num_examples = 20
    version = str(tfds.builder_cls("mnist").VERSION)  # no builder instance: no file or network access
    metadata_dir = tmp_path / "mnist" / version
    metadata_dir.mkdir(parents=True)
    with open(metadata_dir / "dataset_info.json", "w") as f:
        json.dump(
            {
                "name": "mnist",
                "version": version,
                "splits": [
                    {"name": split, "shardLengths": [str(num_examples)], "numBytes": "1"}
                    for split in ("train", "test")
                ],
            },
            f,
        )
    with tfds.testing.mock_data(num_examples=num_examples, data_dir=str(tmp_path)):
        (x_train, y_train), (x_test, y_test), info = datasets.load("mnist", data_dir=str(tmp_path))
    assert x_train.shape == (num_examples, 28, 28, 1) and x_test.shape == (num_examples, 28, 28, 1)
    assert x_train.dtype == np.float32
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    assert x_train.max() > 0.5  # pixels / 255 of random uint8 values, not / 255 twice
    assert np.issubdtype(y_train.dtype, np.integer) and 0 <= y_train.min() and y_train.max() <= 9
    assert info.name == "mnist" and info.num_classes == 10 and info.input_shape == (28, 28, 1)
    assert info.input_radius == pytest.approx(0.2 * 28)
    assert info.preprocessing == "pixels / 255"


# ------------------------------------------------------------ fit refuses bad arrays
def _compiled_model(info):
    model = presets.build_model("dense", info, DPParameters(2.0, 1e-5))
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-2),
        loss=lipdp.losses.DPTauCategoricalCrossentropy(10.0),
        metrics=["accuracy"],
    )
    return model


@pytest.fixture(scope="module")
def trained_model(digits):
    """A model after one short epoch, so that its weights are projected and well defined."""
    (x, y), _, info = digits
    model = _compiled_model(info)
    model.fit(x, y, batch_size=512, epochs=1, sampling_seed=0, verbose=0)
    return model


def _bad_inputs(x, y):
    x_nan = x.copy()
    x_nan[5, 3, 3, 0] = np.nan
    x_inf = x.copy()
    x_inf[0, 0, 0, 0] = np.inf
    y_high = y.copy()
    y_high[7] = 10
    y_negative = y.copy()
    y_negative[2] = -1
    return {
        "nan": (x_nan, y, "NaN"),
        "inf": (x_inf, y, "infinite"),
        "label 10": (x, y_high, "Labels"),
        "label -1": (x, y_negative, "Labels"),
        "length": (x, y[:-1], "same"),
    }


@pytest.mark.parametrize("case", ["nan", "inf", "label 10", "label -1", "length"])
def test_fit_refuses_bad_arrays_and_loses_nothing(digits, trained_model, case):
    (x, y), _, _ = digits
    bad_x, bad_y, message = _bad_inputs(x, y)[case]
    model = trained_model
    weights = [w.copy() for w in model.get_weights()]
    steps = model.privacy_ledger.steps
    iterations = int(model.optimizer.iterations.numpy())
    with pytest.raises(ValueError, match=message):
        model.fit(bad_x, bad_y, batch_size=512, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    assert model.privacy_ledger.steps == steps
    assert int(model.optimizer.iterations.numpy()) == iterations


def test_fit_refuses_nan_before_any_change_on_a_fresh_model(digits):
    (x, y), _, info = digits
    model = _compiled_model(info)
    model.build((None, *info.input_shape))
    weights = [w.copy() for w in model.get_weights()]
    x_nan = x.copy()
    x_nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.fit(x_nan, y, batch_size=512, epochs=1, verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    assert model.privacy_ledger.steps == 0
