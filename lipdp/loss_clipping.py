"""Loss-gradient clipping for clipless training: clip each example's dl/dlogits to C.

All clipless bounds are proportional to the top bound G_top = min(L, C), so a smaller C
means proportionally less noise, at the price of biased gradients for the examples whose
logit gradient exceeded C. C may be fixed, or adapted during training by the quantile
estimator of Andrew et al. (2021), "Differentially private learning with adaptive
clipping": after each step,

    C <- C * exp(-eta * (b~ - gamma)),   b~ = (#{i in batch: ||dl_i/dz_i|| <= C} + N(0, s^2)) / (qN)

which drives C towards the gamma-quantile of the logit-gradient norms. The count is a
release too (sensitivity 1 under add/remove). Released with the gradient on the same
Poisson sample, the pair is one Gaussian mechanism with multiplier
(sigma_g^-2 + s^-2)^(-1/2); lipdp sets the gradient's sigma_g so that this equals the
user's sigma. Every step then is the same accounted event, and the ledger counts the steps
performed, each of which performs exactly one count release (``updates`` counts them).

Every lipdp loss supports it, the multiclass HKR included: the clipping acts on one
example's logit gradient, and lipdp's losses are all per-example (deel-lip's batch-
normalised HKR is not, which is why the reference implementation had to exclude it).
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf

from lipdp.validation import positive_number


def clip_row_gradients(logits: tf.Tensor, clip_norm) -> tf.Tensor:
    """Identity on the logits whose backward pass clips each row of the incoming gradient to
    norm ``clip_norm``. With per-example losses, row i of d(sum_j l_j)/dz is dl_i/dz_i, so
    this clips every example's loss gradient: G_top = min(L, C)."""

    @tf.custom_gradient
    def identity(z):
        return tf.identity(z), lambda upstream: tf.clip_by_norm(upstream, clip_norm, axes=[1])

    return identity(logits)


@dataclass(frozen=True)
class AdaptiveClipping:
    """Settings of the quantile estimator: C starts at ``initial_clip`` and moves towards
    the ``target_quantile`` of the logit-gradient norms at rate ``learning_rate``; the count
    gets Gaussian noise of std ``count_noise_multiplier`` (which must exceed sigma)."""

    initial_clip: float = 1.0
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float = 10.0

    def __post_init__(self):
        positive_number("initial_clip", self.initial_clip)
        positive_number("learning_rate", self.learning_rate)
        positive_number("count_noise_multiplier", self.count_noise_multiplier)
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must lie strictly between 0 and 1, got {self.target_quantile!r}.")

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        """sigma_g with (sigma_g^-2 + s^-2)^(-1/2) = sigma: gradient and count together are
        one Gaussian release of multiplier sigma."""
        if self.count_noise_multiplier <= noise_multiplier:
            raise ValueError(
                f"count_noise_multiplier ({self.count_noise_multiplier}) must exceed the noise multiplier "
                f"({noise_multiplier}): the count takes its share of the privacy budget. Use e.g. 10 * sigma."
            )
        return (noise_multiplier**-2 - self.count_noise_multiplier**-2) ** -0.5


class LossGradientClip(tf.Module):
    """The clip C as a variable (checkpointed with the model), fixed or adaptive, and the
    number of adaptive updates (count releases) performed."""

    def __init__(self, initial_clip: float, adaptive: AdaptiveClipping | None = None):
        super().__init__(name="loss_gradient_clip")
        self.value = tf.Variable(positive_number("loss_gradient_clip", initial_clip), dtype=tf.float32, trainable=False)
        self.updates = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.adaptive = adaptive

    def update(self, logit_gradient_norms: tf.Tensor, expected_batch_size: float, generator: tf.random.Generator,
               ceiling: float):
        """One step of the quantile estimator, with its noisy count. C stays within
        [1e-6 L, L]: above the loss constant L it clips nothing and changes no bound, and
        a C driven to 0 (many exactly-zero hinge gradients) would divide by zero."""
        settings = self.adaptive
        below = tf.reduce_sum(tf.cast(logit_gradient_norms <= self.value, tf.float32))
        noisy_fraction = (below + generator.normal([], stddev=settings.count_noise_multiplier)) / expected_batch_size
        updated = self.value * tf.exp(-settings.learning_rate * (noisy_fraction - settings.target_quantile))
        self.value.assign(tf.clip_by_value(updated, 1e-6 * ceiling, ceiling))
        self.updates.assign_add(1)
