"""DPSequential: the noise, the step's scaling, clear errors, and a real training run."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import loop_per_example_gradient_norms

import lipdp
from lipdp import layers as L
from lipdp import losses
from lipdp.presets import build_model


def small_model(dp_parameters, projection="bjorck"):
    model = lipdp.DPSequential(
        [L.DPBoundedInput(2.0, input_shape=(8, 8, 1)), L.DPSpectralConv2D(8, 3, projection=projection),
         L.DPAddBias(0.5), L.DPGroupSort(2), L.DPFlatten(), L.DPSpectralDense(10, projection=projection)],
        dp_parameters=dp_parameters,
    )
    model.compile(tf.keras.optimizers.SGD(0.01), loss=losses.DPTauCategoricalCrossentropy(4.0))
    return model


# ------------------------------------------------------------------------- noise
@pytest.mark.parametrize("strategy", ["global", "per-layer"])
def test_injected_noise_has_std_sigma_times_bound(strategy):
    sigma, expected_batch = 1.7, 32.0
    model = small_model(lipdp.DPParameters(sigma, 1e-5, strategy))
    model.prepare_run(expected_batch / 1000, 1000)
    bounds = lipdp.gradient_bounds(model)
    names = [v.name for v in model.trainable_variables]
    if strategy == "global":
        expected = {name: sigma * math.sqrt(sum(b * b for b in bounds.values())) for name in names}
    else:  # sigma_k = sigma sqrt(K) on each of the K variables
        expected = {name: sigma * math.sqrt(len(names)) * bounds[name] for name in names}
    samples = {name: [] for name in names}
    for _ in range(200):
        zeros = [tf.zeros_like(v) for v in model.trainable_variables]
        for name, noise in zip(names, model.noisy_mean_gradients(zeros)):
            samples[name].append(noise.numpy().ravel() * expected_batch)
    for name in names:
        draws = np.concatenate(samples[name])
        assert abs(draws.mean()) < 5 * expected[name] / math.sqrt(draws.size)
        assert abs(draws.std() / expected[name] - 1) < 5 / math.sqrt(2 * draws.size) + 1e-3, name


def test_per_layer_noise_is_accounted_as_sigma():
    """sigma_k = sigma sqrt(K) on K variables composes into one Gaussian with multiplier sigma."""
    sigma, count = 1.3, 5
    assert math.isclose(lipdp.accounting.per_layer_noise_multiplier([sigma * math.sqrt(count)] * count), sigma)


def test_non_private_model_adds_no_noise():
    model = small_model(None)
    model.prepare_run(0.1, 100)
    gradients = [tf.ones_like(v) for v in model.trainable_variables]
    for gradient, result in zip(gradients, model.noisy_mean_gradients(gradients)):
        np.testing.assert_allclose(result.numpy(), gradient.numpy() / 10.0, rtol=1e-6)
    with pytest.raises(ValueError, match="no epsilon"):
        model.privacy_statement()


# ------------------------------------------------------------- the step's scaling
def test_step_divides_the_summed_gradient_by_the_expected_batch_size():
    """One non-private step with SGD: the update is -lr * sum_i grad l_i / (qN), whatever
    the realised batch size (dividing by the realised size would leak it)."""
    model = small_model(None, projection="rescale")
    for layer in model.layers:  # shrink kernels so the rescaling projection is inactive
        if hasattr(layer, "kernel"):
            layer.kernel.assign(layer.kernel * 0.5)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, 7)
    with tf.GradientTape() as tape:
        summed = tf.reduce_sum(model.loss(y, model(x, training=True)))
    expected_update = [0.01 * g / 20.0 for g in tape.gradient(summed, model.trainable_variables)]
    before = [v.numpy() for v in model.trainable_variables]
    model.prepare_run(20 / 400, 400)  # expected batch size 20, realised 7
    model.train_step((tf.constant(x), tf.constant(y)))
    for old, new, update in zip(before, model.trainable_variables, expected_update):
        np.testing.assert_allclose(old - new.numpy(), update.numpy(), rtol=1e-3, atol=1e-7)


def test_empty_batch_is_a_valid_step():
    model = small_model(lipdp.DPParameters(1.0, 1e-5))
    model.prepare_run(0.01, 100)
    model.train_step((tf.zeros((0, 8, 8, 1)), tf.zeros((0,), tf.int64)))
    assert model.privacy_ledger.steps == 1


# ------------------------------------------------------------------------ errors
def test_plain_keras_layer_is_refused_by_name():
    with pytest.raises(TypeError, match="'my_dense'.*no per-example gradient bound"):
        lipdp.DPSequential([L.DPBoundedInput(1.0, input_shape=(4,)), tf.keras.layers.Dense(3, name="my_dense")])


def test_batch_normalization_is_refused():
    with pytest.raises(TypeError, match="mixes the examples"):
        lipdp.DPSequential([L.DPBoundedInput(1.0, input_shape=(4,)), tf.keras.layers.BatchNormalization()])


def test_missing_input_bound_is_refused():
    model = lipdp.DPSequential([L.DPFlatten(input_shape=(4, 4, 1)), L.DPSpectralDense(3)], lipdp.DPParameters(1.0, 1e-5))
    model.compile("sgd", loss=losses.DPMulticlassKR())
    with pytest.raises(ValueError, match="DPBoundedInput"):
        lipdp.gradient_bounds(model)


def test_keras_loss_and_wrong_reduction_are_refused_at_compile():
    model = small_model(lipdp.DPParameters(1.0, 1e-5))
    with pytest.raises(TypeError, match="lipdp loss"):
        model.compile("sgd", loss=tf.keras.losses.SparseCategoricalCrossentropy())
    loss = losses.DPMulticlassKR()
    loss.reduction = tf.keras.losses.Reduction.SUM
    with pytest.raises(ValueError, match="reduction"):
        model.compile("sgd", loss=loss)


def test_regularisation_losses_are_refused():
    model = lipdp.DPSequential([L.DPBoundedInput(1.0, input_shape=(4,)),
                                L.DPSpectralDense(3, kernel_regularizer=tf.keras.regularizers.L2(0.1))],
                               lipdp.DPParameters(1.0, 1e-5))
    model.compile("sgd", loss=losses.DPMulticlassKR())
    with pytest.raises(ValueError, match="regularisation"):
        model.fit(np.ones((10, 4), np.float32), np.zeros(10, np.int64), batch_size=2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sample_weight=np.ones(20)), "sample_weight"),
    (dict(class_weight={0: 2.0}), "class_weight"),
    (dict(batch_size=40), "sampling rate"),
])
def test_bad_fit_arguments_are_refused(kwargs, message):
    model = small_model(lipdp.DPParameters(1.0, 1e-5))
    x, y = np.zeros((20, 8, 8, 1), np.float32), np.zeros(20, np.int64)
    with pytest.raises(ValueError, match=message):
        model.fit(x, y, **{"batch_size": 4, **kwargs}, verbose=0)


@pytest.mark.parametrize("kwargs", [dict(noise_multiplier=0.0, delta=1e-5), dict(noise_multiplier=-1.0, delta=1e-5),
                                    dict(noise_multiplier=float("nan"), delta=1e-5), dict(noise_multiplier=1.0, delta=0.0),
                                    dict(noise_multiplier=1.0, delta=1.0), dict(noise_multiplier=1.0, delta=1e-5, noise_strategy="x")])
def test_bad_dp_parameters_are_refused(kwargs):
    with pytest.raises(ValueError, match="must"):
        lipdp.DPParameters(**kwargs)


def test_nan_inputs_are_refused_and_weights_are_kept():
    model = small_model(lipdp.DPParameters(1.0, 1e-5))
    before = [w.copy() for w in model.get_weights()]
    x = np.zeros((20, 8, 8, 1), np.float32)
    x[3, 2, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.fit(x, np.zeros(20, np.int64), batch_size=4, verbose=0)
    for old, new in zip(before, model.get_weights()):
        np.testing.assert_array_equal(old, new)


# ---------------------------------------------------------------------- training
def test_private_training_on_digits_is_far_above_chance(digits):
    (x, y), (x_test, y_test), info = digits
    sigma = lipdp.calibrate_noise_multiplier(3.0, 512 / len(x), 40 * 3, 1e-5)
    tf.keras.utils.set_random_seed(0)
    model = build_model("dense", info, lipdp.DPParameters(sigma, 1e-5))
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=losses.DPTauCategoricalCrossentropy(20 / info.input_radius),
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=512, epochs=40, sampling_seed=0, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy > 0.7
    statement = model.privacy_statement()
    assert statement.epsilon <= 3.0 and statement.steps == 120


def test_trained_model_per_example_norms_match_a_loop(digits):
    (x, y), _, info = digits
    model = build_model("conv", info, lipdp.DPParameters(1.0, 1e-5))
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=losses.DPMulticlassHinge())
    model.fit(x, y, batch_size=256, epochs=1, verbose=0)
    ours, theirs = lipdp.per_example_gradient_norms(model, x[:6], y[:6]), loop_per_example_gradient_norms(model, x[:6], y[:6])
    bounds = lipdp.gradient_bounds(model)
    for name in bounds:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-4, atol=1e-6)
        assert theirs[name].max() <= bounds[name]


# ----------------------------------------------------------------- legacy Keras
def _python(code):
    """A fresh interpreter, without the TF_USE_LEGACY_KERAS that importing lipdp set here."""
    env = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_import_switches_to_legacy_keras_even_after_tensorflow():
    result = _python("import tensorflow as tf, lipdp, tensorflow.keras as k; "
                     "base = [c for c in lipdp.DPSequential.__mro__ if c.__name__ == 'Sequential'][0]; "
                     "print(tf.keras.Model.__module__, k.Sequential.__module__, base.__module__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() and all(part.startswith("tf_keras") for part in result.stdout.split())


def test_keras3_already_bound_gives_a_clear_import_error():
    result = _python("import tensorflow as tf; tf.keras.layers; import lipdp")
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "restart" in result.stderr


def test_variable_and_empty_batches_do_not_retrace():
    model = small_model(lipdp.DPParameters(1.0, 1e-5))
    x, y = np.zeros((200, 8, 8, 1), np.float32), np.zeros(200, np.int64)
    model.fit(x, y, batch_size=1, epochs=3, verbose=0)  # q = 0.005: sizes 0, 1, 2, ...
    assert model.privacy_ledger.steps == 600
    assert model.train_function.experimental_get_tracing_count() <= 2  # Keras traces once or twice, not per step


# ------------------------------------------------ findings of the privacy review
def test_noise_ignores_the_global_seed():
    """The noise must be secret: a user's set_random_seed must not make it replayable."""
    draws = []
    for _ in range(2):
        tf.keras.utils.set_random_seed(0)
        model = small_model(lipdp.DPParameters(1.0, 1e-5))
        model.prepare_run(0.1, 100)
        draws.append(model.noisy_mean_gradients([tf.zeros_like(v) for v in model.trainable_variables])[0].numpy())
    assert not np.allclose(draws[0], draws[1])


@pytest.mark.parametrize("labels", [
    np.eye(10)[np.arange(20) % 10] * 100.0,  # scaled one-hot: multiplies the loss gradient
    np.ones((20, 10)),  # all classes at once
    np.where(np.arange(20) == 3, np.nan, 1.0)[:, None] * np.eye(10)[np.arange(20) % 10],
    np.full(20, 2.5),  # non-integer class
], ids=["scaled_one_hot", "all_ones", "nan_one_hot", "fractional"])
def test_labels_outside_the_loss_assumptions_are_refused(labels):
    model = small_model(lipdp.DPParameters(1.0, 1e-5))
    with pytest.raises(ValueError, match="(?i)one-hot|integer"):
        model.fit(np.zeros((20, 8, 8, 1), np.float32), labels, batch_size=4, verbose=0)


def test_one_hot_labels_are_accepted():
    model = small_model(lipdp.DPParameters(1.0, 1e-5))
    model.fit(np.zeros((20, 8, 8, 1), np.float32), np.eye(10)[np.arange(20) % 10], batch_size=4, verbose=0)
    assert model.privacy_ledger.steps == 5


def test_overflowing_inputs_are_refused_and_clipping_never_returns_nan():
    model = small_model(lipdp.DPParameters(1.0, 1e-5))
    x = np.zeros((20, 8, 8, 1), np.float32)
    x[0] = 3e38
    with pytest.raises(ValueError, match="overflows"):
        model.fit(x, np.zeros(20, np.int64), batch_size=4, verbose=0)
    clipped = L.DPBoundedInput(2.0)(tf.constant(x[:2]))
    assert np.isfinite(clipped.numpy()).all()
    assert np.linalg.norm(clipped.numpy().reshape(2, -1), axis=1).max() <= 2.0


def test_train_on_batch_is_refused():
    model = small_model(lipdp.DPParameters(1.0, 1e-5))
    with pytest.raises(TypeError, match="Poisson"):
        model.train_on_batch(np.zeros((4, 8, 8, 1), np.float32), np.zeros(4, np.int64))


def test_non_private_steps_make_epsilon_infinite():
    """Training first without noise, then switching privacy on: epsilon is infinite, and
    the second fit really adds noise (the train function is rebuilt for each fit)."""
    model = small_model(None)
    x, y = np.zeros((40, 8, 8, 1), np.float32), np.zeros(40, np.int64)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.dp_parameters = lipdp.DPParameters(1.0, 1e-5)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert math.isinf(model.privacy_statement().epsilon)
    assert all(std > 0 for std in model.noise_stddevs().values())
    with pytest.raises(lipdp.accounting.BudgetExhaustedError, match="without noise"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[lipdp.PrivacyBudget(3.0)])


def test_noise_follows_the_variables_after_freezing_a_layer():
    model = small_model(lipdp.DPParameters(1.0, 1e-5, "per-layer"))
    x, y = np.zeros((40, 8, 8, 1), np.float32), np.zeros(40, np.int64)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    model.layers[1].trainable = False
    model.compile(tf.keras.optimizers.SGD(0.01), loss=losses.DPTauCategoricalCrossentropy(4.0))
    frozen = model.layers[1].kernel.numpy()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    np.testing.assert_allclose(model.layers[1].kernel.numpy(), frozen, atol=1e-6)  # projection: a fixed point
    bounds, stds = lipdp.gradient_bounds(model), model.noise_stddevs()
    assert set(stds) == {v.name for v in model.trainable_variables} and len(stds) == 2
    assert all(math.isclose(stds[name], math.sqrt(2) * bounds[name]) for name in stds)  # sigma sqrt(K), K = 2


def test_a_layer_used_twice_is_refused():
    shared = L.DPSpectralDense(8)
    model = lipdp.DPSequential([L.DPBoundedInput(1.0, input_shape=(8,)), shared,
                                L.DPResidual([shared]), L.DPSpectralDense(3)], lipdp.DPParameters(1.0, 1e-5))
    model.compile("sgd", loss=losses.DPMulticlassKR())
    with pytest.raises(ValueError, match="used twice"):
        lipdp.gradient_bounds(model)


def test_reduced_precision_is_refused():
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with pytest.raises(ValueError, match="float32"):
            small_model(lipdp.DPParameters(1.0, 1e-5))
    finally:
        tf.keras.mixed_precision.set_global_policy("float32")
