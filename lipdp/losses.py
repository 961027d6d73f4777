"""Per-example losses with their Lipschitz constant with respect to the logits.

The clipless bound starts at the top: G_top = L, a bound on ``||dl_i/dz_i||`` for one
example's loss l_i and its logits z_i. That needs a *per-example* loss: l_i may depend on
example i only. deel-lip's KR and HKR losses normalise by the number of examples of each
class *in the batch*, so a rare-class example's gradient grows with the batch (a single
example of its class in a batch of 256 gets ~25x the weight): they are reformulated here.

Every loss returns one value per example (reduction NONE). The DP train step sums them:
a SUM_OVER_BATCH_SIZE reduction would divide by the realised batch size (which leaks), a
SUM reduction inside Keras would hide the per-example structure, so both are refused.

Labels may be integers or one-hot vectors.
"""

from __future__ import annotations

import math

import tensorflow as tf
from deel.lip.losses import TauCategoricalCrossentropy, multiclass_hinge

from lipdp.validation import positive_number

NONE = tf.keras.losses.Reduction.NONE


def as_one_hot(y_true, y_pred):
    """One-hot labels, from integer labels (shape (b,) or (b, 1)) or one-hot ones."""
    y_true, y_pred = tf.convert_to_tensor(y_true), tf.convert_to_tensor(y_pred)
    if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == y_pred.shape[-1] and y_pred.shape[-1] != 1:
        return tf.cast(y_true, y_pred.dtype)
    labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
    return tf.one_hot(labels, depth=tf.shape(y_pred)[-1], dtype=y_pred.dtype)


class DPLoss(tf.keras.losses.Loss):
    """A per-example loss l(z, y) with a proven bound L on ``||dl/dz||``."""

    def __init__(self, name: str, reduction=NONE):
        check_reduction(reduction, name)
        super().__init__(reduction=NONE, name=name)

    def lipschitz_constant(self, num_classes: int) -> float:
        """L: the bound on one example's ``||dl/dz||`` for ``num_classes`` logits."""
        raise NotImplementedError

    def call(self, y_true, y_pred):
        return self.per_example_loss(as_one_hot(y_true, y_pred), y_pred)

    def per_example_loss(self, y_true, y_pred):
        raise NotImplementedError


def check_reduction(reduction, name: str = "loss") -> None:
    if reduction != NONE:
        raise ValueError(
            f"{name}: reduction={reduction!r} would break the per-example bounds (SUM_OVER_BATCH_SIZE "
            "divides by the realised batch size, which leaks; SUM hides the per-example terms). "
            "lipdp losses use reduction NONE; the DP train step sums them and divides by the "
            "expected batch size itself."
        )


class DPTauCategoricalCrossentropy(DPLoss):
    """Cross-entropy with temperature: ``l = CE(softmax(tau z), y) / tau`` (deel-lip's).

    dl/dz = softmax(tau z) - y, whose norm is below sqrt(2): L = sqrt(2), for any tau.
    """

    def __init__(self, tau: float, reduction=NONE, name: str = "DPTauCategoricalCrossentropy"):
        super().__init__(name, reduction)
        self.tau = positive_number("tau", tau)
        self._deel_lip_loss = TauCategoricalCrossentropy(self.tau)

    def per_example_loss(self, y_true, y_pred):
        return self._deel_lip_loss.call(y_true, y_pred)

    def lipschitz_constant(self, num_classes: int) -> float:
        return math.sqrt(2.0)

    def get_config(self):
        return {"tau": self.tau, "name": self.name}


class DPMulticlassHinge(DPLoss):
    """deel-lip's multiclass hinge: the mean over the K classes of
    ``relu(m/2 - s_k z_k)``, s_k = +1 for the true class (weighted K-1) and -1 otherwise.

    dl/dz has entry -(K-1)/K on the true class and 1/K on the others (when active):
    L = sqrt((K-1)^2/K^2 + (K-1)/K^2) = sqrt((K-1)/K).
    """

    def __init__(self, min_margin: float = 1.0, reduction=NONE, name: str = "DPMulticlassHinge"):
        super().__init__(name, reduction)
        self.min_margin = positive_number("min_margin", min_margin)

    def per_example_loss(self, y_true, y_pred):
        return multiclass_hinge(y_true, y_pred, self.min_margin)

    def lipschitz_constant(self, num_classes: int) -> float:
        return math.sqrt((num_classes - 1) / num_classes)

    def get_config(self):
        return {"min_margin": self.min_margin, "name": self.name}


def per_example_kr(y_true, y_pred):
    """``l = -(z_y - mean_{j != y} z_j)``: one example's share of the multiclass KR loss.

    deel-lip's MulticlassKR averages, over classes k, ``mean_{i: y_i = k} z_ik -
    mean_{i: y_i != k} z_ik`` with means over the *batch's* members of each class. Here
    every example carries the same weight; for balanced classes the expectation of -l
    equals deel-lip's population KR term. ``||dl/dz|| = sqrt(1 + 1/(K-1))``.
    """
    num_classes = tf.cast(tf.shape(y_pred)[-1], y_pred.dtype)
    true_logit = tf.reduce_sum(y_true * y_pred, axis=-1)
    other_mean = (tf.reduce_sum(y_pred, axis=-1) - true_logit) / (num_classes - 1.0)
    return other_mean - true_logit


class DPMulticlassKR(DPLoss):
    """Per-example multiclass Kantorovich-Rubinstein loss (see :func:`per_example_kr`).

    L = sqrt(K / (K-1)).
    """

    def __init__(self, reduction=NONE, name: str = "DPMulticlassKR"):
        super().__init__(name, reduction)

    def per_example_loss(self, y_true, y_pred):
        return per_example_kr(y_true, y_pred)

    def lipschitz_constant(self, num_classes: int) -> float:
        return math.sqrt(num_classes / (num_classes - 1))

    def get_config(self):
        return {"name": self.name}


class DPMulticlassHKR(DPLoss):
    """Per-example hinge-KR: ``l = KR_i + alpha * hinge_i`` (deel-lip's HKR, with the
    per-example KR term of :func:`per_example_kr`).

    When every hinge term is active the two gradients point the same way
    (both are multiples of (-(K-1), 1, ..., 1)), so the triangle inequality is tight:
    L = sqrt(K/(K-1)) + alpha sqrt((K-1)/K).
    """

    def __init__(self, alpha: float = 10.0, min_margin: float = 1.0, reduction=NONE, name: str = "DPMulticlassHKR"):
        super().__init__(name, reduction)
        self.alpha = positive_number("alpha", alpha, allow_zero=True)
        self.min_margin = positive_number("min_margin", min_margin)

    def per_example_loss(self, y_true, y_pred):
        return per_example_kr(y_true, y_pred) + self.alpha * multiclass_hinge(y_true, y_pred, self.min_margin)

    def lipschitz_constant(self, num_classes: int) -> float:
        kr = math.sqrt(num_classes / (num_classes - 1))
        hinge = math.sqrt((num_classes - 1) / num_classes)
        return kr + self.alpha * hinge

    def get_config(self):
        return {"alpha": self.alpha, "min_margin": self.min_margin, "name": self.name}


class DPKCosineSimilarity(DPLoss):
    """``l = -<y/||y||, z / max(||z||, 1/K)>``: cosine similarity, made K-Lipschitz.

    ``z -> z / max(||z||, r)`` is the projection onto the ball of radius r, divided by r:
    (1/r)-Lipschitz. With r = 1/K, L = K. (TF's ``l2_normalize(z, epsilon=e)`` divides by
    ``max(||z||, sqrt(e))``, hence epsilon = 1/K^2.)
    """

    def __init__(self, K: float = 1.0, reduction=NONE, name: str = "DPKCosineSimilarity"):
        super().__init__(name, reduction)
        self.K = positive_number("K", K)

    def per_example_loss(self, y_true, y_pred):
        direction = tf.linalg.l2_normalize(y_true, axis=-1)
        scaled = tf.linalg.l2_normalize(y_pred, axis=-1, epsilon=1.0 / self.K**2)
        return -tf.reduce_sum(direction * scaled, axis=-1)

    def lipschitz_constant(self, num_classes: int) -> float:
        return self.K

    def get_config(self):
        return {"K": self.K, "name": self.name}


def check_dp_loss(loss) -> DPLoss:
    """The loss of a DP model: a lipdp loss, still with reduction NONE."""
    if not isinstance(loss, DPLoss):
        raise TypeError(
            f"A DP model needs a lipdp loss with a known Lipschitz constant, got {loss!r}. "
            "Use one of lipdp.losses: DPTauCategoricalCrossentropy, DPMulticlassHinge, "
            "DPMulticlassKR, DPMulticlassHKR, DPKCosineSimilarity."
        )
    check_reduction(loss.reduction, loss.name)
    return loss
