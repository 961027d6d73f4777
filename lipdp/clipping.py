"""Standard DP-SGD with per-example clipping, for any Keras model: the baseline that
clipless training replaces, in the same API, sampler and accountant.

One step: per-example gradients (vectorised), each clipped to norm C as a whole,
summed, plus N(0, sigma^2 C^2) on every coordinate, divided by the expected batch size.
"""

from __future__ import annotations

import tensorflow as tf

from lipdp.bounds import per_example_gradients
from lipdp.model import DPParameters, PrivateTraining
from lipdp.validation import positive_number


class DPClippedModel(PrivateTraining, tf.keras.Model):
    """Wraps any Keras model (unconstrained layers included) for DP-SGD with per-example
    clipping to ``clip_norm``. ``dp_parameters=None`` trains without noise or clipping."""

    def __init__(self, model: tf.keras.Model, dp_parameters: DPParameters | None, clip_norm: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.inner = model
        self.clip_norm = positive_number("clip_norm", clip_norm)
        self._init_privacy(dp_parameters)
        self.check_layers()
        if dp_parameters is not None and dp_parameters.noise_strategy != "global":
            raise ValueError("Clipped DP-SGD clips the whole gradient to C, so its noise is global: "
                             "use noise_strategy='global'.")

    def call(self, inputs, training=None):
        return self.inner(inputs, training=training)

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        if loss is None:
            raise ValueError("Compile with a per-example loss, e.g. SparseCategoricalCrossentropy(from_logits=True).")
        loss = tf.keras.losses.get(loss)  # a name becomes a callable loss: each example's is computed alone
        self._check_compile_options(kwargs)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    @property
    def output_shape(self):
        return self.inner.output_shape

    def project(self) -> None:
        """Unconstrained: nothing to restore."""
        return None

    def noise_stddevs(self) -> dict[str, float]:
        """sigma * C on every coordinate: C bounds each clipped per-example gradient."""
        std = self.dp_parameters.noise_multiplier * self.clip_norm if self.is_private else 0.0
        return {v.name: std for v in self.trainable_variables}

    def clipped_per_example_gradients(self, x, y) -> list[tf.Tensor]:
        """Per-example gradients (batch, *variable.shape), each scaled so that its norm over
        all variables together is at most C (unclipped when training without privacy)."""
        gradients = per_example_gradients(self, x, y)
        if not self.is_private:
            return gradients
        squares = tf.add_n([tf.reduce_sum(tf.reshape(g * g, (tf.shape(g)[0], -1)), axis=1) for g in gradients])
        scale = self.clip_norm / tf.maximum(tf.sqrt(squares), self.clip_norm)
        return [g * tf.reshape(scale, [-1] + [1] * (g.shape.rank - 1)) for g in gradients]

    def summed_gradients(self, x, y):
        logits = self(x, training=True)
        self.compiled_loss(y, logits)  # the progress bar's loss (on private batches: not private)
        return logits, [tf.reduce_sum(g, axis=0) for g in self.clipped_per_example_gradients(x, y)]
