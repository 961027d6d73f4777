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
    (lambda: DPClippedModel(tf.keras.Sequential([tf.keras.layers.Dense(4, input_shape=(3,)),
                                                 tf.keras.layers.BatchNormalization()]), None), "statistics"),
    (lambda: lipdp.DPSequential([L.DPBoundedInput(1.0, input_shape=(4,)), L.DPSpectralDense(3)], loss_gradient_clip=-1.0),
     "loss_gradient_clip"),
])
def test_unsupported_combinations_are_refused(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
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
    assert all(math.isclose(a / 2, b, rel_tol=1e-6) for a, b in zip(full.values(), half.values()))  # C in float32
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
        total = tf.reduce_sum(model.loss(y, lipdp.loss_clipping.clip_row_gradients(logits, 0.3)))
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


# ------------------------------------------------------------------ adaptive clipping
from lipdp.loss_clipping import AdaptiveClipping  # noqa: E402


def adaptive_model(info, sigma=2.0, **settings):
    model = presets.build_model("dense", info, lipdp.DPParameters(sigma, 1e-5),
                                adaptive_clipping=AdaptiveClipping(**settings))
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=losses.DPMulticlassHKR(2.0, 0.5), metrics=["accuracy"])
    return model


def test_adaptive_releases_are_accounted_as_performed(digits):
    """One noisy count per step performed, and each step is accounted once, as one
    Gaussian of multiplier sigma (gradient sigma_g and count s composed): the same epsilon
    as the fixed-clip run, with the budget callback stopping both at the same step."""
    (x, y), _, info = digits
    model = adaptive_model(info, initial_clip=0.5, count_noise_multiplier=20.0)
    model.fit(x, y, batch_size=256, epochs=4, verbose=0, callbacks=[lipdp.PrivacyBudget(2.5)])
    steps = model.privacy_ledger.steps
    assert model.clip_updates == steps > 0
    assert model.privacy_statement().epsilon == pytest.approx(
        lipdp.compute_epsilon(2.0, 256 / len(x), steps, 1e-5), rel=1e-12)


def test_adaptive_clip_moves_towards_the_target_quantile(digits):
    (x, y), _, info = digits
    high = adaptive_model(info, initial_clip=50.0, learning_rate=0.5, target_quantile=0.5)
    high.fit(x, y, batch_size=512, epochs=10, verbose=0)  # every norm is below 50: C must shrink
    assert high.loss_gradient_clip < 10.0
    low = adaptive_model(info, initial_clip=1e-3, learning_rate=0.5, target_quantile=0.5)
    low.fit(x, y, batch_size=512, epochs=10, verbose=0)  # every norm is above 1e-3: C must grow
    assert low.loss_gradient_clip > 1e-2


def test_adaptive_noise_follows_the_live_clip_and_the_gradient_share(digits):
    _, _, info = digits
    settings = AdaptiveClipping(initial_clip=0.4, count_noise_multiplier=8.0)
    model = presets.build_model("dense", info, lipdp.DPParameters(2.0, 1e-5), adaptive_clipping=settings)
    model.compile(loss=losses.DPMulticlassHKR(2.0, 0.5))
    fixed = presets.build_model("dense", info, lipdp.DPParameters(2.0, 1e-5), loss_gradient_clip=0.4)
    fixed.compile(loss=losses.DPMulticlassHKR(2.0, 0.5))
    share = settings.gradient_noise_multiplier(2.0) / 2.0
    assert share == pytest.approx((1 - (2.0 / 8.0) ** 2) ** -0.5)
    expected = [s * share for s in fixed.noise_stddevs().values()]
    assert list(model.noise_stddevs().values()) == pytest.approx(expected, rel=1e-6)  # the public figure too
    live = {n: float(s) for n, s in model.step_noise_stddevs().items()}
    assert list(live.values()) == pytest.approx(expected, rel=1e-6)
    model._clip.value.assign(0.2)  # the step reads the variable: half the clip, half the noise
    assert [float(s) for s in model.step_noise_stddevs().values()] == pytest.approx([s / 2 for s in live.values()], rel=1e-5)


def test_adaptive_bounds_hold_for_the_current_clip(digits):
    (x, y), (x_test, y_test), info = digits
    model = adaptive_model(info, initial_clip=0.3)
    model.fit(x, y, batch_size=256, epochs=2, verbose=0)
    bounds = lipdp.gradient_bounds(model)
    norms = lipdp.per_example_gradient_norms(model, x_test[:64], y_test[:64])
    assert all(norms[name].max() <= bound for name, bound in bounds.items())


@pytest.mark.parametrize("make, message", [
    (lambda: AdaptiveClipping(target_quantile=1.0), "target_quantile"),
    (lambda: AdaptiveClipping(initial_clip=0.0), "initial_clip"),
    (lambda: AdaptiveClipping(count_noise_multiplier=1.0).gradient_noise_multiplier(2.0), "must exceed"),
    (lambda: lipdp.DPSequential([L.DPBoundedInput(1.0, input_shape=(4,)), L.DPSpectralDense(3)],
                                adaptive_clipping=AdaptiveClipping()), "needs dp_parameters"),
    (lambda: lipdp.DPSequential([L.DPBoundedInput(1.0, input_shape=(4,)), L.DPSpectralDense(3)],
                                lipdp.DPParameters(1.0, 1e-5), loss_gradient_clip=1.0,
                                adaptive_clipping=AdaptiveClipping()), "not both"),
])
def test_bad_adaptive_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_stateful_layers_added_after_wrapping_are_refused_at_fit():
    """The review's bypass: BatchNorm added to the inner model after wrapping updated its
    moving statistics from private batches without noise."""
    inner = tf.keras.Sequential([tf.keras.layers.Flatten(input_shape=(4,)), tf.keras.layers.Dense(3)])
    model = DPClippedModel(inner, lipdp.DPParameters(1.0, 1e-5))
    inner.add(tf.keras.layers.BatchNormalization())
    model.compile("sgd", loss=CE)
    with pytest.raises(TypeError, match="statistics"):
        model.fit(np.zeros((20, 4), np.float32), np.zeros(20, np.int64), batch_size=4, verbose=0)


def test_adaptive_clip_stays_within_its_range(digits):
    """Hinge gradients are often exactly 0: with a low target quantile C would shrink to 0
    (then NaN); it is held in [1e-6 L, L]."""
    (x, y), _, info = digits
    model = presets.build_model("dense", info, lipdp.DPParameters(2.0, 1e-5), adaptive_clipping=AdaptiveClipping(
        initial_clip=1e-5, learning_rate=5.0, target_quantile=0.05))
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=losses.DPMulticlassHinge(0.1))
    model.fit(x, y, batch_size=512, epochs=5, verbose=0)
    bound = model.loss.lipschitz_constant(10)
    assert 1e-6 * bound * (1 - 1e-6) <= model.loss_gradient_clip <= bound * (1 + 1e-6)
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_clipped_training_follows_a_frozen_layer(digits):
    (x, y), _, info = digits
    model = DPClippedModel(presets.build_keras_model("dense", info), lipdp.DPParameters(2.0, 1e-5), clip_norm=1.0)
    model.compile(tf.keras.optimizers.SGD(0.1), loss=CE)
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    model.inner.layers[1].trainable = False
    model.compile(tf.keras.optimizers.SGD(0.1), loss=CE)
    frozen = model.inner.layers[1].kernel.numpy()
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    np.testing.assert_array_equal(model.inner.layers[1].kernel.numpy(), frozen)
