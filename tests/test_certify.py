"""Certified radii hold against attacks, use the proven Lipschitz constant, and the metric agrees."""

import math

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import certify, layers
from lipdp.presets import build_model, make_loss

RADIUS = 0.1


def _train(info, x, y, validation, dp_parameters=None):
    model = build_model("dense", info, dp_parameters)
    metric = certify.CertifiedAccuracy(RADIUS, certify.lipschitz_constant(model))
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=make_loss("tau-cce", info, 20.0), metrics=["accuracy", metric])
    history = model.fit(x, y, batch_size=512, epochs=40, validation_data=validation, verbose=0)
    return model, history.history


@pytest.fixture(scope="module")
def trained(digits):
    (x, y), (x_test, y_test), info = digits
    tf.keras.utils.set_random_seed(0)
    return _train(info, x, y, (x_test, y_test))


@pytest.fixture(scope="module")
def private(digits):
    (x, y), (x_test, y_test), info = digits
    return _train(info, x, y, (x_test, y_test), lipdp.DPParameters(2.0, 1e-5))[0]


@pytest.fixture(scope="module")
def scaled(trained, digits):
    """The trained model with its last kernel tripled (not projected): logits x3, L = 3."""
    model, _ = trained
    info = digits[2]
    copy = build_model("dense", info, None)
    copy.set_weights(model.get_weights())
    copy.layers[-1].kernel.assign(3.0 * copy.layers[-1].kernel)
    return copy


def _certified_examples(model, x, y, count=100):
    radii = certify.certified_radii(model, x, y)
    chosen = np.flatnonzero(radii > 0)[:count]
    return x[chosen], y[chosen], radii[chosen]


def _flips(model, x, y, radius) -> int:
    adversarial = certify.margin_attack(model, x, y, radius, steps=20)
    moved = np.linalg.norm((adversarial - x).reshape(len(x), -1), axis=1)
    # the attack stays in its ball, up to float32 rounding of x + d (absolute: radii can be tiny)
    assert np.all(moved <= np.broadcast_to(radius, moved.shape) * (1 + 1e-4) + 1e-6)
    return int(np.sum(model.predict(adversarial, verbose=0).argmax(axis=1) != y))


@pytest.mark.parametrize("which", ["non-private", "private"])
def test_attacks_within_the_certified_radius_never_change_the_prediction(which, trained, private, digits):
    model = trained[0] if which == "non-private" else private
    (_, _), (x_test, y_test), _ = digits
    x, y, radii = _certified_examples(model, x_test, y_test)
    assert len(x) >= 50
    assert _flips(model, x, y, 0.99 * radii) == 0
    # negative control: the same attack, with a certificate pretending L were 10x smaller, flips many
    assert _flips(model, x, y, 10 * radii) > len(x) // 2


def test_radii_use_the_proven_lipschitz_constant_not_an_assumed_one(scaled, digits):
    (_, _), (x_test, y_test), _ = digits
    assert certify.lipschitz_constant(scaled) == pytest.approx(3.0, rel=0.01)
    x, y, radii = _certified_examples(scaled, x_test, y_test)
    assert _flips(scaled, x, y, 0.99 * radii) == 0
    assumed_one = certify.logit_margins(scaled(x), y).numpy() / math.sqrt(2)  # radius if L were taken as 1
    np.testing.assert_allclose(assumed_one, 3 * radii, rtol=1e-4)
    assert _flips(scaled, x, y, 0.99 * assumed_one) > 0


def test_radius_rule_is_the_margin_over_sqrt2_L(scaled, digits):
    (_, _), (x_test, y_test), _ = digits
    logits = scaled.predict(x_test, verbose=0)
    true = logits[np.arange(len(y_test)), y_test]
    others = np.where(np.eye(10, dtype=bool)[y_test], -np.inf, logits).max(axis=1)
    expected = np.maximum(true - others, 0) / (math.sqrt(2) * certify.lipschitz_constant(scaled))
    np.testing.assert_allclose(certify.certified_radii(scaled, x_test, y_test), expected, rtol=1e-5, atol=1e-7)
    assert certify.certified_accuracy(expected, 0.0) == pytest.approx(np.mean(logits.argmax(axis=1) == y_test))


@pytest.mark.parametrize("preset", ["dense", "resnet"])
def test_lipschitz_constant_bounds_the_jacobian(preset, digits):
    (_, _), (x_test, _), info = digits
    model = build_model(preset, info, None)
    if preset == "dense":
        model.layers[2].kernel.assign(2.0 * model.layers[2].kernel)  # weights set by hand: L follows them
    bound = certify.lipschitz_constant(model)
    x = tf.constant(np.concatenate([x_test[:8], 0.1 * x_test[8:16]]))  # clipped and unclipped inputs
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = model(x)
    jacobians = tape.batch_jacobian(logits, x).numpy().reshape(len(x), logits.shape[-1], -1)
    largest = max(np.linalg.norm(j, ord=2) for j in jacobians)
    assert largest <= bound * (1 + 1e-5)
    assert bound == (pytest.approx(2.0, rel=1e-3) if preset == "dense" else 1.0)


def test_keras_metric_matches_the_radii(trained, digits):
    model, history = trained
    (_, _), (x_test, y_test), _ = digits
    expected = certify.certified_accuracy(certify.certified_radii(model, x_test, y_test), RADIUS)
    name = f"certified_accuracy_{RADIUS:g}"
    assert history[f"val_{name}"][-1] == pytest.approx(expected, abs=1e-6)
    assert 0 < expected < history["val_accuracy"][-1]
    metric = certify.CertifiedAccuracy.from_config(model.compiled_metrics.metrics[-1].get_config())
    assert (metric.radius, metric.lipschitz_constant, metric.name) == (RADIUS, 1.0, name)
    metric.update_state(tf.one_hot(y_test, 10), model.predict(x_test, verbose=0))  # one-hot labels too
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


def test_certified_accuracy_is_decreasing_in_the_radius():
    radii = np.array([0.0, 0.1, 0.2, 0.4])
    np.testing.assert_allclose(certify.certified_accuracy(radii, [0.0, 0.1, 0.3, 1.0]), [0.75, 0.5, 0.25, 0.0])
    assert certify.certified_accuracy(radii, 0.15) == 0.5


def test_logit_margins():
    logits = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]], np.float32)
    np.testing.assert_allclose(certify.logit_margins(logits, np.array([0, 0])), [1.0, -5.0])
    np.testing.assert_allclose(certify.logit_margins(logits, np.eye(3)[[2, 1]]), [-1.0, 4.0])


def test_bad_inputs_get_clear_errors(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="non-empty"):
        certify.certified_accuracy(np.array([]), 0.1)
    with pytest.raises(ValueError, match="radius"):
        certify.certified_accuracy(np.ones(3), -0.1)
    with pytest.raises(ValueError, match="same"):
        certify.certified_radii(model, np.zeros((3, 8, 8, 1)), np.zeros(2, int))
    with pytest.raises(ValueError, match="radius"):
        certify.CertifiedAccuracy(-1.0, 1.0)
    with pytest.raises(TypeError, match="no proven Lipschitz constant"):
        certify.lipschitz_constant(tf.keras.Sequential([tf.keras.layers.Dense(3, input_shape=(4,))]))
    single = lipdp.DPSequential([layers.DPBoundedInput(1.0, input_shape=(4,)), layers.DPSpectralDense(1)])
    with pytest.raises(ValueError, match="at least 2 logits"):
        certify.certified_radii(single, np.ones((2, 4)), np.zeros(2, int))
