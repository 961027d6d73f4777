"""Per-example clipping (the DP-SGD baseline) and loss-gradient clipping in clipless mode."""

import math

import numpy as np
import pytest
import tensorflow as tf
from conftest import loop_per_example_gradient_norms

import lipdp
from lipdp import layers as L
from lipdp import presets
from lipdp import losses
from lipdp.clipping import DPClippedModel

CE = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def plain_model(seed=0):
    tf.keras.utils.set_random_seed(seed)
    return tf.keras.Sequential([tf.keras.layers.Flatten(input_shape=(8, 8, 1)), tf.keras.layers.Dense(32, activation="relu"),
                                tf.keras.layers.Dense(10)])


def clipped(dp_parameters, clip_norm=0.5):
    model = DPClippedModel(plain_model(), dp_parameters, clip_norm=clip_norm)
    model.compile(tf.keras.optimizers.SGD(0.1), loss=CE, metrics=["accuracy"])
    return model


def test_clipped_per_example_gradients_match_a_loop_reference():
    model = clipped(lipdp.DPParameters(1.0, 1e-5), clip_norm=0.5)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 8, 8, 1)).astype(np.float32) * 3, rng.integers(0, 10, 6)
    ours = model.clipped_per_example_gradients(tf.constant(x), tf.constant(y))
    ours_norms = np.sqrt(sum(np.sum(g.numpy().reshape(6, -1) ** 2, axis=1) for g in ours))
    for i in range(6):  # reference: one example at a time, clipped by hand
        with tf.GradientTape() as tape:
            loss = CE(y[i:i + 1], model(x[i:i + 1], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        norm = math.sqrt(sum(float(tf.reduce_sum(g * g)) for g in grads))
        for g_ref, g in zip(grads, ours):
            np.testing.assert_allclose(g[i].numpy(), g_ref.numpy() * min(1.0, 0.5 / norm), rtol=1e-4, atol=1e-6)
    assert ours_norms.max() <= 0.5 * (1 + 1e-6)
    assert ours_norms.max() > 0.4  # some examples were really clipped


def test_clipped_noise_is_sigma_times_c():
    model = clipped(lipdp.DPParameters(1.5, 1e-5), clip_norm=0.5)
    assert set(model.noise_stddevs().values()) == {0.75}


def test_modes_share_sampler_and_accountant(digits):
    (x, y), _, info = digits
    sigma = 1.3
    clipless = presets.build_model("dense", info, lipdp.DPParameters(sigma, 1e-5))
    clipless.compile(tf.keras.optimizers.Adam(1e-2), loss=losses.DPTauCategoricalCrossentropy(10.0))
    model = DPClippedModel(presets.build_keras_model("dense", info), lipdp.DPParameters(sigma, 1e-5), clip_norm=1.0)
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=CE, metrics=["accuracy"])
    for m in (clipless, model):
        m.fit(x, y, batch_size=256, epochs=2, verbose=0)
    assert clipless.privacy_statement().epsilon == model.privacy_statement().epsilon
    assert clipless.privacy_statement().steps == model.privacy_statement().steps == 12


def test_clipped_training_learns_and_stops_on_budget(digits):
    (x, y), (x_test, y_test), info = digits
    model = DPClippedModel(presets.build_keras_model("dense", info), lipdp.DPParameters(2.0, 1e-5), clip_norm=1.0)
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=CE, metrics=["accuracy"])
    history = model.fit(x, y, batch_size=256, epochs=8, verbose=0, callbacks=[lipdp.PrivacyBudget(3.0)])
    assert model.privacy_statement().epsilon <= 3.0 and history.history["epsilon"]
    assert model.evaluate(x_test, y_test, verbose=0)[1] > 0.5


def test_empty_batches_are_valid_clipped_steps():
    model = clipped(lipdp.DPParameters(1.0, 1e-5))
    model.prepare_run(0.01, 100)
    model.train_step((tf.zeros((0, 8, 8, 1)), tf.zeros((0,), tf.int64)))
    assert model.privacy_ledger.steps == 1


@pytest.mark.parametrize("make, message", [
    (lambda: DPClippedModel(plain_model(), lipdp.DPParameters(1.0, 1e-5, "per-layer")), "global"),
    (lambda: DPClippedModel(plain_model(), lipdp.DPParameters(1.0, 1e-5), clip_norm=0.0), "clip_norm"),
    (lambda: lipdp.DPSequential([L.DPBoundedInput(1.0, input_shape=(4,)), L.DPSpectralDense(3)], loss_gradient_clip=-1.0),
     "loss_gradient_clip"),
])
def test_unsupported_combinations_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ------------------------------------------------------------ loss-gradient clipping
def clipless(loss_gradient_clip):
    model = lipdp.DPSequential([L.DPBoundedInput(2.0, input_shape=(8, 8, 1)), L.DPSpectralConv2D(4, 3), L.DPAddBias(0.5),
                                L.DPGroupSort(2), L.DPFlatten(), L.DPSpectralDense(10)],
                               lipdp.DPParameters(1.0, 1e-5), loss_gradient_clip=loss_gradient_clip)
    model.compile(tf.keras.optimizers.SGD(0.1), loss=losses.DPTauCategoricalCrossentropy(30.0))
    return model


def test_loss_gradient_clipping_lowers_the_noise_in_proportion():
    full = clipless(None).noise_stddevs()
    half = clipless(math.sqrt(2) / 2).noise_stddevs()  # L = sqrt(2) for the tau cross-entropy
    assert all(math.isclose(a / 2, b, rel_tol=1e-9) for a, b in zip(full.values(), half.values()))
    assert list(clipless(10.0).noise_stddevs().values()) == pytest.approx(list(full.values()))  # C > L changes nothing


def test_clipped_loss_gradients_stay_within_the_lowered_bounds():
    model = clipless(0.3)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(12, 8, 8, 1)).astype(np.float32) * 3, rng.integers(0, 10, 12)
    bounds = lipdp.gradient_bounds(model)
    ours = lipdp.per_example_gradient_norms(model, x, y)
    assert all(ours[name].max() <= bound for name, bound in bounds.items())
    logits = tf.Variable(model(x))
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(model.loss(y, lipdp.model.clip_row_gradients(logits, 0.3)))
    assert np.linalg.norm(tape.gradient(total, logits).numpy(), axis=1).max() <= 0.3 * (1 + 1e-6)


def test_without_the_clipping_the_lowered_bound_would_break():
    """KR's logit gradient always has norm L = sqrt(K/(K-1)): on a dense layer the kernel
    gradient reaches the bound, so only the clipping keeps it below C * X."""
    model = lipdp.DPSequential([L.DPBoundedInput(1.0, input_shape=(4,)), L.DPSpectralDense(10)],
                               lipdp.DPParameters(1.0, 1e-5), loss_gradient_clip=0.3)
    model.compile("sgd", loss=losses.DPMulticlassKR())
    x, y = np.eye(4, dtype=np.float32) * 3, np.arange(4)
    (name, bound), = lipdp.gradient_bounds(model).items()
    assert lipdp.per_example_gradient_norms(model, x, y)[name].max() == pytest.approx(0.3, rel=1e-4)
    assert bound == pytest.approx(0.3, rel=1e-4)
    assert loop_per_example_gradient_norms(model, x, y)[name].max() > 3 * bound  # the loop does not clip
