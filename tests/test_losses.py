"""Per-example losses: one example's gradient w.r.t. its logits stays below the
constant L, whatever the batch; the constants are tight; bad reductions are refused."""

import numpy as np
import pytest
import tensorflow as tf
from deel.lip.losses import MulticlassKR

from lipdp import losses

K = 10
LOSSES = {
    "tau_cce": lambda: losses.DPTauCategoricalCrossentropy(16.0),
    "hinge": lambda: losses.DPMulticlassHinge(0.7),
    "kr": losses.DPMulticlassKR,
    "hkr": lambda: losses.DPMulticlassHKR(5.0, 0.5),
    "cosine": lambda: losses.DPKCosineSimilarity(3.0),
}


def logit_gradients(loss, labels, logits):
    """Row i: d(sum_j l_j)/d z_i, i.e. example i's own gradient when the loss is per-example."""
    logits = tf.convert_to_tensor(logits, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        total = tf.reduce_sum(loss(labels, logits))
    return tape.gradient(total, logits).numpy()


def max_gradient_norm(loss, labels, logits):
    return np.linalg.norm(logit_gradients(loss, labels, logits), axis=1).max()


def optimised_logits(loss, labels, start, steps=200):
    """Gradient ascent on each example's ||dl/dz||."""
    z = tf.Variable(start.astype(np.float32))
    optimizer = tf.keras.optimizers.Adam(0.05)
    for _ in range(steps):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                total = tf.reduce_sum(loss(labels, z))
            norms = tf.reduce_sum(tf.square(inner.gradient(total, z)))
        ascent = outer.gradient(norms, z, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        optimizer.apply_gradients([(-ascent, z)])
    return z.numpy()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_per_example_gradient_is_below_the_constant(name):
    loss = LOSSES[name]()
    bound = loss.lipschitz_constant(K)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, K, 64)
    worst = 0.0
    for scale in (1e-3, 0.1, 1.0, 10.0, 100.0):
        worst = max(worst, max_gradient_norm(loss, labels, rng.normal(size=(64, K)) * scale))
    worst = max(worst, max_gradient_norm(loss, labels[:16], optimised_logits(loss, labels[:16], rng.normal(size=(16, K)))))
    assert worst <= bound * (1 + 1e-5)
    tightness = {"tau_cce": 0.9}.get(name, 0.999)
    assert worst >= tightness * bound, f"{name}: the constant {bound} is loose (max seen {worst})"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_rare_class_example_gets_no_extra_weight(name):
    """A batch of 255 examples of class 0 and one of class 9: the rare example's gradient
    is its own, below L, and the same as when it is alone (no batch normalisation)."""
    loss = LOSSES[name]()
    rng = np.random.default_rng(1)
    labels = np.array([0] * 255 + [9])
    logits = rng.normal(size=(256, K)).astype(np.float32)
    in_batch = logit_gradients(loss, labels, logits)[-1]
    alone = logit_gradients(loss, labels[-1:], logits[-1:])[0]
    np.testing.assert_allclose(in_batch, alone, rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(in_batch) <= loss.lipschitz_constant(K) * (1 + 1e-5)


def test_deel_lip_batch_kr_would_break_the_bound():
    """DESIGN trap 3: deel-lip's MulticlassKR divides by per-batch class counts, so a
    rare-class example's gradient (in sum units) is ~B/K times larger than L."""
    labels = tf.one_hot([0] * 255 + [9], K)
    logits = tf.random.stateless_normal((256, K), seed=(0, 0))
    with tf.GradientTape() as tape:
        tape.watch(logits)
        elementwise = MulticlassKR(reduction=tf.keras.losses.Reduction.NONE)(labels, logits)
        as_sum = tf.reduce_sum(elementwise)  # deel-lip's "per-example" terms, summed as the DP step does
    rare = np.linalg.norm(tape.gradient(as_sum, logits).numpy()[-1])
    assert rare > 10 * losses.DPMulticlassKR().lipschitz_constant(K)


def test_integer_and_one_hot_labels_agree():
    loss = losses.DPMulticlassHKR(2.0, 1.0)
    logits = np.random.default_rng(3).normal(size=(8, K)).astype(np.float32)
    labels = np.arange(8) % K
    np.testing.assert_allclose(loss(labels, logits), loss(tf.one_hot(labels, K), logits), rtol=1e-6)
    np.testing.assert_allclose(loss(labels[:, None], logits), loss(labels, logits), rtol=1e-6)


def test_losses_return_one_value_per_example():
    for make in LOSSES.values():
        values = make()(np.arange(5) % K, np.zeros((5, K), np.float32))
        assert values.shape == (5,)


def test_kr_expectation_matches_the_balanced_kr_term():
    """For balanced classes, the mean per-example KR equals minus deel-lip's KR term."""
    labels = np.repeat(np.arange(K), 20)
    logits = np.random.default_rng(4).normal(size=(len(labels), K)).astype(np.float32)
    ours = float(tf.reduce_mean(losses.DPMulticlassKR()(labels, logits)))
    theirs = float(tf.reduce_mean(MulticlassKR(reduction=tf.keras.losses.Reduction.NONE)(tf.one_hot(labels, K), logits)))
    assert abs(ours + theirs) < 1e-5


@pytest.mark.parametrize("reduction", [tf.keras.losses.Reduction.SUM, tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE,
                                       tf.keras.losses.Reduction.AUTO])
def test_wrong_reduction_is_refused(reduction):
    with pytest.raises(ValueError, match="reduction"):
        losses.DPMulticlassKR(reduction=reduction)


def test_reduction_changed_later_is_refused_at_check():
    loss = losses.DPMulticlassHinge()
    loss.reduction = tf.keras.losses.Reduction.SUM
    with pytest.raises(ValueError, match="reduction"):
        losses.check_dp_loss(loss)


def test_keras_loss_is_refused():
    with pytest.raises(TypeError, match="Lipschitz constant"):
        losses.check_dp_loss(tf.keras.losses.CategoricalCrossentropy())


@pytest.mark.parametrize("make", [
    lambda: losses.DPTauCategoricalCrossentropy(0.0), lambda: losses.DPTauCategoricalCrossentropy(float("nan")),
    lambda: losses.DPMulticlassHinge(-1.0), lambda: losses.DPMulticlassHKR(alpha=-1.0),
    lambda: losses.DPKCosineSimilarity(0.0),
])
def test_bad_loss_parameters_are_refused(make):
    with pytest.raises(ValueError, match="must be"):
        make()
