"""Certified robustness of Lipschitz networks: radii from logit margins, certified accuracy.

The rule. Let the map x -> z(x) from inputs to logits be L-Lipschitz in the L2 norm, and
let m(x) = z_y(x) - max_{j != y} z_j(x) be the margin of the true class y. For any
perturbation d and any class j, the difference z_y - z_j is the inner product of z with
e_y - e_j, a vector of norm sqrt(2), so it moves by at most sqrt(2) L ||d||. Hence the
prediction stays y for every ||d|| < m(x) / (sqrt(2) L): that is the **certified radius**
(0 when the example is misclassified, m <= 0). An example is *certified at radius r* when
its certified radius exceeds r; certified accuracy at r is the fraction of such examples,
and at r = 0 it is the plain accuracy.

L is the model's *proven* Lipschitz constant (:func:`lipschitz_constant`), not an assumed
1. Radii are in the model's input units (for digits: pixels / 16). The input clipping of
``DPBoundedInput`` is a projection onto a ball, which is 1-Lipschitz: it is part of the
chain and the certificate covers it. The certificate holds in exact arithmetic; float32
rounding moves a margin by about 1e-6 of its scale. Unlike the privacy guarantee it is a
property of each test input, and it says nothing about perturbations in other norms.

The radii and the Keras metric use deel-lip's ``CategoricalProvableAvgRobustness`` and
``CategoricalProvableRobustAccuracy`` with ``disjoint_neurons=False`` (the sqrt(2) L
factor: lipdp's last layer bounds the whole logit vector, not each logit separately).
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from deel.lip.metrics import CategoricalProvableAvgRobustness, CategoricalProvableRobustAccuracy

from lipdp.layers import DPLayer, chain_bounds, check_no_shared_layers
from lipdp.losses import as_one_hot
from lipdp.quiet import quiet
from lipdp.validation import positive_number

NONE = tf.keras.losses.Reduction.NONE


def lipschitz_constant(model: tf.keras.Model) -> float:
    """A proven upper bound on the L2 Lipschitz constant of x -> logits: the product of the
    layers' proven bounds (a residual block: (1 + L_branch) / 2), i.e. the input-gradient
    bound of :func:`lipdp.layers.chain_bounds` for an output gradient of norm 1."""
    layers = [layer for layer in model.layers if not isinstance(layer, tf.keras.layers.InputLayer)]
    unproven = [layer.name for layer in layers if not isinstance(layer, DPLayer)]
    if unproven:
        raise TypeError(f"Layers {unproven} have no proven Lipschitz constant, so no radius can be certified. "
                        "Build the network from lipdp.layers (DPSpectralDense, DPSpectralConv2D, DPGroupSort, ...).")
    check_no_shared_layers(layers)
    return chain_bounds(layers, math.inf, 1.0).input_gradient_bound


def logit_margins(logits, labels) -> tf.Tensor:
    """m = z_y - max_{j != y} z_j per example (negative when misclassified).
    ``labels``: integer classes or one-hot rows."""
    logits = tf.convert_to_tensor(logits, tf.float32)
    one_hot = as_one_hot(labels, logits)
    true_logit = tf.reduce_sum(one_hot * logits, axis=-1)
    runner_up = tf.reduce_max(tf.where(one_hot > 0, -np.inf, logits), axis=-1)
    return true_logit - runner_up


def _check_multiclass(logits) -> None:
    if logits.shape[-1] is not None and logits.shape[-1] < 2:
        raise ValueError(f"Certified radii need at least 2 logits (multiclass), got {logits.shape[-1]}.")


def predict_logits(model: tf.keras.Model, x: np.ndarray, batch_size: int = 1024) -> tf.Tensor:
    """The model's logits on x (inference mode), without Keras' warnings about retracing
    when many models predict in turn (audits train one per shadow split)."""
    with quiet("tensorflow"):
        return tf.convert_to_tensor(model.predict(np.asarray(x, np.float32), batch_size=batch_size, verbose=0))


def certified_radii(model: tf.keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Per example: max(m, 0) / (sqrt(2) L), the L2 radius within which the prediction
    provably stays the true class (0 for misclassified examples)."""
    x, y = _check_examples(x, y)
    logits = predict_logits(model, x, batch_size)
    _check_multiclass(logits)
    radius = CategoricalProvableAvgRobustness(
        lip_const=lipschitz_constant(model), disjoint_neurons=False, reduction=NONE)
    with quiet("tensorflow"):  # each call traces deel-lip's tf.function anew: harmless retracing warnings
        return radius.call(as_one_hot(y, logits), logits).numpy()


def certified_accuracy(radii: np.ndarray, radius) -> np.ndarray | float:
    """Fraction of examples whose certified radius exceeds ``radius`` (a number or an
    array of them): the accuracy guaranteed against every L2 perturbation of that size."""
    radii = np.asarray(radii, dtype=np.float64)
    if radii.ndim != 1 or len(radii) == 0:
        raise ValueError(f"radii must be a non-empty 1-D array (one per example), got shape {radii.shape}.")
    thresholds = np.asarray(radius, dtype=np.float64)
    if not np.all(np.isfinite(thresholds)) or np.any(thresholds < 0):
        raise ValueError(f"radius must be non-negative and finite, got {radius!r}.")
    result = (radii[:, None] > thresholds.reshape(-1)[None, :]).mean(axis=0)
    return float(result[0]) if thresholds.ndim == 0 else result


class CertifiedAccuracy(tf.keras.metrics.MeanMetricWrapper):
    """Keras metric: certified accuracy at a fixed L2 ``radius`` for a network whose logits
    are ``lipschitz_constant``-Lipschitz (take it from :func:`lipschitz_constant`; DP models
    keep it after every step by projection). Wraps deel-lip's
    ``CategoricalProvableRobustAccuracy`` and accepts integer labels.

    During ``fit`` the value is measured on private training batches: it is *not* covered by
    the privacy guarantee. Its ``val_`` counterpart on held-out data is."""

    def __init__(self, radius: float, lipschitz_constant: float, name: str | None = None, dtype=None):
        self.radius = positive_number("radius", radius, allow_zero=True)
        self.lipschitz_constant = positive_number("lipschitz_constant", lipschitz_constant)
        certificate = CategoricalProvableRobustAccuracy(
            epsilon=self.radius, lip_const=self.lipschitz_constant, disjoint_neurons=False, reduction=NONE)

        def certified(y_true, y_pred):
            return certificate.call(as_one_hot(y_true, y_pred), y_pred)

        super().__init__(certified, name=name or f"certified_accuracy_{self.radius:g}", dtype=dtype)

    def get_config(self):
        return {"radius": self.radius, "lipschitz_constant": self.lipschitz_constant,
                "name": self.name, "dtype": self.dtype}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def margin_attack(model: tf.keras.Model, x: np.ndarray, y: np.ndarray, radius, steps: int = 20) -> np.ndarray:
    """Projected gradient descent on the margin within the L2 ball ``||d_i|| <= radius_i``
    around each example (``radius``: a number or one per example).

    Each step moves d along the normalised gradient of -m by 2.5 r / steps (Madry et al.'s
    step size) and projects back onto the ball; the iterate with the lowest margin is kept.
    An empirical attack: it finds *some* bad perturbations, it proves nothing.
    """
    x, y = _check_examples(x, y)
    radii = np.broadcast_to(np.asarray(radius, np.float32), (len(x),))
    if not np.all(np.isfinite(radii)) or np.any(radii < 0):
        raise ValueError("radius must be non-negative and finite.")
    if not (isinstance(steps, int) and steps > 0):
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    shape = (-1,) + (1,) * (x.ndim - 1)
    r = tf.reshape(tf.constant(radii), shape)
    x = tf.constant(x)
    delta = tf.zeros_like(x)
    best, best_margin = x, logit_margins(model(x, training=False), y)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(delta)
            margin = logit_margins(model(x + delta, training=False), y)
        gradient = tape.gradient(margin, delta)
        delta = delta - 2.5 * r / steps * gradient / tf.maximum(_norms(gradient, shape), 1e-12)
        delta = delta * tf.minimum(1.0, r / tf.maximum(_norms(delta, shape), 1e-12))
        margin = logit_margins(model(x + delta, training=False), y)
        improved = tf.reshape(margin < best_margin, shape)
        best, best_margin = tf.where(improved, x + delta, best), tf.minimum(margin, best_margin)
    return best.numpy()


def _norms(tensor: tf.Tensor, shape: tuple) -> tf.Tensor:
    return tf.reshape(tf.norm(tf.reshape(tensor, (tf.shape(tensor)[0], -1)), axis=1), shape)


def _check_examples(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must hold the same, positive number of examples, got {len(x)} and {len(y)}.")
    return x, y
