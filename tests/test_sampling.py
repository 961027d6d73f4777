"""Poisson sampling (DESIGN §4) and the refusal of fixed-size shuffled batches (§5, trap 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

import lipdp
import tensorflow as tf
from lipdp import datasets, presets
from lipdp.model import DPParameters
from lipdp.sampling import poisson_batch_indices, poisson_dataset

N, Q, STEPS = 1000, 0.05, 4000


@pytest.fixture(scope="module")
def batches():
    return list(poisson_batch_indices(N, Q, STEPS, seed=12345))


# ----------------------------------------------------------- poisson_batch_indices
def test_batch_size_mean_and_variance_are_binomial(batches):
    sizes = np.array([len(b) for b in batches], dtype=np.float64)
    n = len(sizes)
    mean, var = N * Q, N * Q * (1 - Q)
    # standard error of the sample mean
    assert abs(sizes.mean() - mean) <= 5 * math.sqrt(var / n)
    # standard error of the sample variance: sqrt((mu4 - var^2 (n-3)/(n-1)) / n), with the
    # binomial's fourth central moment mu4 = var * (1 + 3 (N - 2) Q (1 - Q)).
    mu4 = var * (1 + 3 * (N - 2) * Q * (1 - Q))
    se_var = math.sqrt((mu4 - var**2 * (n - 3) / (n - 1)) / n)
    assert abs(sizes.var(ddof=1) - var) <= 5 * se_var
    # and the whole distribution (chi-square on bins <= 38, 39, ..., 61, >= 62)
    edges = np.arange(39, 62)
    observed = np.array([np.sum(sizes < 39)] + [np.sum(sizes == k) for k in edges] + [np.sum(sizes > 61)])
    law = stats.binom(N, Q)
    expected = np.concatenate([[law.cdf(38)], law.pmf(edges), [law.sf(61)]]) * n
    assert expected.min() > 5
    assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-4


def test_inclusion_is_uniform_over_examples(batches):
    counts = np.bincount(np.concatenate(batches), minlength=N)
    assert counts.shape == (N,)
    # chi-square against the uniform: each example is in a batch with probability Q
    assert stats.chisquare(counts).pvalue > 1e-4
    # per example, inclusion count ~ Binomial(STEPS, Q): no example strays beyond 5.5 sd
    sd = math.sqrt(STEPS * Q * (1 - Q))
    assert np.abs(counts - STEPS * Q).max() <= 5.5 * sd
    # the counts' spread is binomial too (shuffled epochs put every example in exactly one
    # batch per epoch: nearly no spread)
    assert counts.var(ddof=1) == pytest.approx(STEPS * Q * (1 - Q), rel=0.2)


def test_pairs_of_examples_join_independently(batches):
    # Under Poisson sampling, two given examples share a batch with probability Q^2.
    # Counted over all adjacent pairs (i, i+1); overlapping pairs add ~10 % to the variance.
    pairs = 0
    for b in batches:
        members = np.zeros(N, dtype=bool)
        members[b] = True
        pairs += int(np.sum(members[:-1] & members[1:]))
    expected = STEPS * (N - 1) * Q * Q
    assert abs(pairs - expected) <= 6 * math.sqrt(expected)


def test_indices_unique_integer_and_in_range(batches):
    for b in batches:
        assert isinstance(b, np.ndarray)
        assert np.issubdtype(b.dtype, np.integer)
        assert len(np.unique(b)) == len(b)
        if len(b):
            assert b.min() >= 0 and b.max() < N


def test_number_of_batches_equals_steps():
    for steps in (0, 1, 7, 100):
        assert len(list(poisson_batch_indices(50, 0.2, steps, seed=0))) == steps


def test_seeded_runs_reproduce_and_seeds_differ():
    first = list(poisson_batch_indices(200, 0.1, 20, seed=7))
    again = list(poisson_batch_indices(200, 0.1, 20, seed=7))
    other = list(poisson_batch_indices(200, 0.1, 20, seed=8))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(len(a) == len(b) and np.array_equal(a, b) for a, b in zip(first, other))


def test_full_batch_when_q_is_one():
    for b in poisson_batch_indices(30, 1.0, 3, seed=0):
        assert sorted(b.tolist()) == list(range(30))


def test_empty_batches_occur_with_tiny_q():
    result = list(poisson_batch_indices(10, 0.001, 200, seed=3))
    empty = [b for b in result if len(b) == 0]
    assert len(empty) > 150  # P(empty) = 0.999^10 ~ 0.99
    for b in empty:
        assert isinstance(b, np.ndarray) and b.shape == (0,)
        assert np.arange(10)[b].shape == (0,)  # usable as an index


@pytest.mark.parametrize(
    "num_examples, q, steps",
    [(100, 1.5, 5), (100, 0.0, 5), (100, -0.1, 5), (0, 0.1, 5), (-5, 0.1, 5), (100, 0.1, -1), (100.0, 0.1, 5)],
)
def test_bad_inputs_raise_value_error(num_examples, q, steps):
    with pytest.raises(ValueError):
        list(poisson_batch_indices(num_examples, q, steps, seed=0))


# ----------------------------------------------------------------- poisson_dataset
def _toy_arrays(n=40):
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    y = np.arange(n, dtype=np.int64) % 4
    return x, y


def test_poisson_dataset_has_unknown_batch_dimension():
    x, y = _toy_arrays()
    ds = poisson_dataset(x, y, 0.25, 5, seed=0)
    x_spec, y_spec = ds.element_spec
    assert x_spec.shape.as_list() == [None, 3]
    assert y_spec.shape.as_list() == [None]
    assert x_spec.dtype == tf.float32 and y_spec.dtype == tf.int64


def test_poisson_dataset_batches_are_the_sampled_examples():
    x, y = _toy_arrays()
    steps = 12
    got = list(poisson_dataset(x, y, 0.25, steps, seed=21).as_numpy_iterator())
    indices = list(poisson_batch_indices(len(x), 0.25, steps, seed=21))
    assert len(got) == steps
    sizes = set()
    for (bx, by), idx in zip(got, indices):
        np.testing.assert_array_equal(bx, x[idx])
        np.testing.assert_array_equal(by, y[idx])
        sizes.add(len(bx))
    assert len(sizes) > 1  # batch sizes vary: not a fixed-size pipeline


def test_poisson_dataset_passes_empty_batches():
    x, y = _toy_arrays(10)
    got = list(poisson_dataset(x, y, 0.001, 30, seed=1).as_numpy_iterator())
    assert len(got) == 30
    empties = [(bx, by) for bx, by in got if len(bx) == 0]
    assert empties
    bx, by = empties[0]
    assert bx.shape == (0, 3) and by.shape == (0,)


# ------------------------------------------------------------- trap 1 in the model
@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def _model(info, sigma=2.0, metrics=("accuracy",)):
    model = presets.build_model("dense", info, DPParameters(sigma, 1e-5))
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-2),
        loss=lipdp.losses.DPTauCategoricalCrossentropy(10.0),
        metrics=list(metrics),
    )
    return model


def test_fit_refuses_a_tf_data_dataset(digits):
    """Trap 1: a shuffled fixed-size pipeline is not what the Poisson accountant assumes."""
    (x, y), _, info = digits
    model = _model(info)
    fixed = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x)).batch(256, drop_remainder=True)
    with pytest.raises(TypeError):
        model.fit(fixed, epochs=1, verbose=0)  # the usual Keras call
    with pytest.raises(TypeError, match="Poisson"):
        model.fit(fixed, None, epochs=1, verbose=0)
    with pytest.raises(TypeError, match="Poisson"):
        model.fit((pair for pair in [(x[:10], y[:10])]), None, epochs=1, verbose=0)
    assert model.privacy_ledger.steps == 0
    assert model.optimizer.iterations.numpy() == 0


def test_fit_dataset_refusal_explains_why(digits):
    (x, y), _, info = digits
    model = _model(info)
    fixed = tf.data.Dataset.from_tensor_slices((x, y)).batch(256)
    with pytest.raises(TypeError, match="Poisson"):
        model.fit(fixed, epochs=1, verbose=0)


@pytest.mark.parametrize("option", ["shuffle", "steps_per_epoch", "sample_weight", "class_weight"])
def test_fit_refuses_batching_options(digits, option):
    (x, y), _, info = digits
    model = _model(info)
    value = {"shuffle": True, "steps_per_epoch": 3, "sample_weight": np.ones(len(x)), "class_weight": {0: 2.0}}[option]
    with pytest.raises(ValueError, match=option):
        model.fit(x, y, batch_size=256, epochs=1, verbose=0, **{option: value})
    assert model.privacy_ledger.steps == 0


class LastBatchSize(tf.keras.metrics.Metric):
    """Reports the size of the batch the train step just saw."""

    def __init__(self, name="batch_size", **kwargs):
        super().__init__(name=name, **kwargs)
        self.size = self.add_weight(name="size", initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.size.assign(tf.cast(tf.shape(y_pred)[0], tf.float32))

    def result(self):
        return self.size


class RecordBatchSizes(tf.keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.sizes = []

    def on_train_batch_end(self, batch, logs=None):
        self.sizes.append(int(logs["batch_size"]))


def test_fit_trains_on_poisson_batches_of_the_accounted_rate(digits):
    (x, y), _, info = digits
    model = _model(info, metrics=[LastBatchSize()])
    recorder = RecordBatchSizes()
    batch_size, epochs = 256, 4
    model.fit(x, y, batch_size=batch_size, epochs=epochs, sampling_seed=0, callbacks=[recorder], verbose=0)
    steps_per_epoch = round(len(x) / batch_size)
    sizes = np.array(recorder.sizes)
    assert len(sizes) == epochs * steps_per_epoch
    # Poisson: sizes vary around the expected batch size, with binomial spread.
    q = batch_size / len(x)
    sd = math.sqrt(len(x) * q * (1 - q))
    assert len(set(sizes.tolist())) > 1, "every batch had the same size: not Poisson sampling"
    assert abs(sizes.mean() - batch_size) <= 5 * sd / math.sqrt(len(sizes))
    assert 0.3 * sd < sizes.std(ddof=1) < 2.0 * sd
    # and the ledger accounts exactly that rate and those steps
    assert model.privacy_ledger.segments == ((pytest.approx(q, rel=1e-12), 2.0, epochs * steps_per_epoch),)
