"""DP models and the clipless private train step.

One step, with Poisson sampling at rate q over N examples (DESIGN §3):

    g = ( sum_{i in batch} grad l_i  +  N(0, sigma^2 C^2) ) / (q N),   then project.

C comes from the analytic bounds of :mod:`lipdp.bounds`, never from the data:
"global" noise uses C = sqrt(sum_k Delta_k^2) on every coordinate; "per-layer" noise uses
sigma_k Delta_k on variable k with sigma_k = sigma sqrt(K), which composes into one
Gaussian of noise multiplier (sum_k sigma_k^-2)^(-1/2) = sigma. The division is by the
*expected* batch size qN: dividing by the realised size would leak it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from lipdp.accounting import PrivacyLedger, PrivacyStatement, check_delta, check_noise_multiplier
from lipdp.bounds import gradient_bounds
from lipdp.layers import check_dp_layer, current_value
from lipdp.losses import check_dp_loss
from lipdp.sampling import expected_batch_size_to_rate, poisson_dataset, steps_per_epoch
from lipdp.loss_clipping import AdaptiveClipping, LossGradientClip, clip_row_gradients

NOISE_STRATEGIES = ("global", "per-layer")


@dataclass(frozen=True)
class DPParameters:
    """The privacy side of training: noise multiplier sigma, delta, noise strategy."""

    noise_multiplier: float
    delta: float
    noise_strategy: str = "global"

    def __post_init__(self):
        check_noise_multiplier(self.noise_multiplier)
        check_delta(self.delta)
        if self.noise_strategy not in NOISE_STRATEGIES:
            raise ValueError(f"noise_strategy must be one of {NOISE_STRATEGIES}, got {self.noise_strategy!r}.")


def noise_stddevs(bounds: list[float], noise_multiplier: float, strategy: str) -> list[float]:
    """Noise std per variable for per-variable gradient bounds Delta_k."""
    if strategy == "global":
        return [noise_multiplier * math.sqrt(sum(b * b for b in bounds))] * len(bounds)
    return [noise_multiplier * math.sqrt(len(bounds)) * b for b in bounds]


class PrivateTraining:
    """What every lipdp training mode shares: Poisson-sampled ``fit`` on arrays, the
    secret noise, division by the expected batch size, the ledger and the statement.

    A mode defines ``summed_gradients(x, y) -> (logits, per-variable sums of per-example
    gradients)``, ``noise_stddevs()`` and ``project()``.
    """

    def _init_privacy(self, dp_parameters: DPParameters | None) -> None:
        if dp_parameters is not None and not isinstance(dp_parameters, DPParameters):
            raise TypeError(f"dp_parameters must be a lipdp.DPParameters or None, got {dp_parameters!r}.")
        self.dp_parameters = dp_parameters
        self.privacy_ledger = PrivacyLedger()
        # The noise must be secret: never drawn from the global seed that users set for
        # reproducible initialisations (tf.keras.utils.set_random_seed).
        self._noise_generator = tf.random.Generator.from_non_deterministic_state()
        self._expected_batch_size = None  # qN, set by prepare_run

    @staticmethod
    def _check_compile_options(kwargs: dict) -> None:
        for option in ("loss_weights", "weighted_metrics"):
            if kwargs.get(option) is not None:
                raise ValueError(f"{option} is not supported by DP models: it would reweight examples.")
        if tf.keras.mixed_precision.global_policy().compute_dtype != "float32":
            raise ValueError("DP models compute in float32: reduced precision would void the bounds' float32 margin. "
                             "Set tf.keras.mixed_precision.set_global_policy('float32').")
        if kwargs.setdefault("steps_per_execution", 1) != 1:
            raise ValueError("steps_per_execution must be 1: the privacy budget is checked after every step.")
        kwargs.setdefault("jit_compile", False)  # XLA on CPU: slow or hanging compiles, see DESIGN §4b

    @property
    def is_private(self) -> bool:
        return self.dp_parameters is not None

    def check_layers(self) -> None:
        """Refuse layers whose state training updates from private batches without noise
        (BatchNormalization's moving statistics, any running average): trainable leaf
        layers that hold non-trainable variables. Frozen layers are fine."""
        stateful = [
            layer.name for layer in self.submodules
            if isinstance(layer, tf.keras.layers.Layer) and layer.trainable and layer.non_trainable_weights
            and not any(isinstance(inner, tf.keras.layers.Layer) for inner in layer.submodules)
        ]
        if stateful:
            raise TypeError(
                f"Layers {stateful} keep statistics that training updates from private batches without "
                "noise (BatchNormalization and the like also mix examples). Remove them, or use per-example "
                "normalisation (LayerNormalization, GroupNormalization)."
            )

    def privacy_statement(self, accountant: str = "pld") -> PrivacyStatement:
        """(epsilon, delta) of everything this model has trained on so far."""
        if not self.is_private:
            raise ValueError("This model trains without privacy (dp_parameters=None): it has no epsilon.")
        return self.privacy_ledger.statement(self.dp_parameters.delta, accountant)

    def prepare_run(self, sampling_rate: float, num_examples: int) -> None:
        """Fix this fit's expected batch size and open a ledger segment (sigma = 0 for a
        non-private run: its steps then make epsilon infinite)."""
        self._expected_batch_size = sampling_rate * num_examples
        self.train_function = None  # retrace: the step bakes in its constants
        sigma = self.dp_parameters.noise_multiplier if self.is_private else 0.0
        self.privacy_ledger.begin(sampling_rate, sigma)

    # ------------------------------------------------------------------ the DP step
    def noisy_mean_gradients(self, summed_gradients: list[tf.Tensor]) -> list[tf.Tensor]:
        """(sum of per-example gradients + N(0, std_k^2)) / (q N), for the gradients of
        ``self.trainable_variables``. The stds are computed here, when the step is traced,
        for exactly the variables being trained (Keras may restore the trainable state of
        compile time inside fit)."""
        variables = self.trainable_variables
        if len(summed_gradients) != len(variables):
            raise ValueError(f"Expected {len(variables)} gradients, one per trainable variable, got {len(summed_gradients)}.")
        stds = self.step_noise_stddevs()
        return [
            (gradient + self._noise_generator.normal(tf.shape(gradient), stddev=stds[v.name]) if self.is_private else gradient)
            / self._expected_batch_size
            for gradient, v in zip(summed_gradients, variables)
        ]

    def step_noise_stddevs(self) -> dict:
        """The stds the step adds (floats, or tensors when they follow a variable)."""
        return self.noise_stddevs()

    def train_step(self, data):
        x, y = data
        logits, summed = self.summed_gradients(x, y)
        gradients = self.noisy_mean_gradients(summed)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        self.project()
        self.privacy_ledger.record_step()
        return self.compute_metrics(x, y, logits, sample_weight=None)

    def train_on_batch(self, *args, **kwargs):
        raise TypeError(
            "DP models train through fit(x, y, batch_size=...): a batch chosen by hand is not a "
            "Poisson sample, so the accountant's epsilon would not hold."
        )

    # ------------------------------------------------------------------------- fit
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray | None = None,
        batch_size: int = 256,
        epochs: int = 1,
        *,
        sampling_seed: int | None = None,
        callbacks=None,
        validation_data=None,
        initial_epoch: int = 0,
        verbose="auto",
        **kwargs,
    ):
        """Train on arrays with Poisson-sampled batches of *expected* size ``batch_size``.

        Training metrics (loss, accuracy) are computed on private batches: they are
        *not* covered by the privacy guarantee, and callbacks that act on them (early
        stopping on "loss", ...) make training depend on them. Validation metrics on
        held-out data are fine. ``sampling_seed`` is for tests: batches drawn from a known
        or reused seed are no longer secret, which voids the sampling part of the
        guarantee; leave it None (fresh OS entropy) for private training.
        """
        for option in ("sample_weight", "class_weight", "validation_split", "steps_per_epoch", "shuffle"):
            if kwargs.pop(option, None) is not None:
                raise ValueError(
                    f"fit(..., {option}=...) is not supported by DP models: lipdp draws Poisson batches "
                    "itself (pass validation data explicitly as validation_data=(x, y))."
                )
        if self.loss is None:
            raise RuntimeError("Compile the model with a loss before fit().")
        self.check_layers()  # layers may have been added since construction
        if self.losses:
            raise ValueError(
                "The model has regularisation losses (kernel_regularizer, add_loss, ...): their "
                "gradients have no per-example bound. Remove them."
            )
        x, y = check_training_arrays(x, y, int(self.output_shape[-1]))
        sampling_rate = expected_batch_size_to_rate(batch_size, len(x))
        epoch_steps = steps_per_epoch(len(x), batch_size)
        dataset = poisson_dataset(x, y, sampling_rate, (epochs - initial_epoch) * epoch_steps, sampling_seed)
        self.project()  # weights set or loaded by hand are projected before any step
        self.prepare_run(sampling_rate, len(x))
        return super().fit(
            dataset, epochs=epochs, steps_per_epoch=epoch_steps, callbacks=callbacks,
            validation_data=validation_data, initial_epoch=initial_epoch, verbose=verbose, **kwargs,
        )


class DPSequential(PrivateTraining, tf.keras.Sequential):
    """A Sequential model of DP layers, trained privately without clipping (or not at all).

    ``dp_parameters=None`` trains without noise (and without a privacy guarantee), with
    the same Poisson batches, scaling and projection. Residual blocks enter as
    :class:`lipdp.layers.DPResidual` layers. ``loss_gradient_clip=C`` clips each
    example's gradient w.r.t. the logits to norm C, which lowers every bound (and the
    noise) by min(L, C) / L.

    ``fit(x, y, batch_size=B, epochs=E)`` takes arrays: B is the *expected* batch size,
    batches are Poisson-sampled at q = B / N, and one epoch is round(N / B) steps.
    """

    def __init__(self, layers=None, dp_parameters: DPParameters | None = None, name: str | None = None,
                 loss_gradient_clip: float | None = None, adaptive_clipping: AdaptiveClipping | None = None):
        super().__init__(layers=layers, name=name)
        self._init_privacy(dp_parameters)
        if loss_gradient_clip is not None and adaptive_clipping is not None:
            raise ValueError("Give loss_gradient_clip (fixed C) or adaptive_clipping (adapted C), not both.")
        if adaptive_clipping is not None:
            if dp_parameters is None:
                raise ValueError("adaptive_clipping releases a noisy count: it needs dp_parameters.")
            adaptive_clipping.gradient_noise_multiplier(dp_parameters.noise_multiplier)  # checks the split
            self._clip = LossGradientClip(adaptive_clipping.initial_clip, adaptive_clipping)
        else:
            self._clip = None if loss_gradient_clip is None else LossGradientClip(loss_gradient_clip)

    @property
    def loss_gradient_clip(self) -> float | None:
        """The current loss-gradient clip C (None: no clipping)."""
        return None if self._clip is None else current_value(lambda: self._clip.value)

    @property
    def clip_updates(self) -> int:
        """Adaptive clip updates performed (each one a noisy-count release)."""
        return 0 if self._clip is None else int(self._clip.updates.numpy())

    def add(self, layer):
        if not isinstance(layer, tf.keras.layers.InputLayer):  # an input placeholder is the identity
            check_dp_layer(layer)
        super().add(layer)

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        check_dp_loss(loss)
        self._check_compile_options(kwargs)
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def project(self) -> None:
        """Restore every layer's Lipschitz constraint (post-processing)."""
        for layer in self.layers:
            layer.project()

    def noise_stddevs(self) -> dict[str, float]:
        """Std of the Gaussian noise added to each variable's summed gradient."""
        if not self.is_private:
            return {v.name: 0.0 for v in self.trainable_variables}
        bounds = gradient_bounds(self)
        names = [v.name for v in self.trainable_variables]
        sigma = self.dp_parameters.noise_multiplier
        if self._clip is not None and self._clip.adaptive is not None:
            sigma = self._clip.adaptive.gradient_noise_multiplier(sigma)  # the count takes the rest
        stds = noise_stddevs([bounds[n] for n in names], sigma, self.dp_parameters.noise_strategy)
        return dict(zip(names, stds))

    def step_noise_stddevs(self) -> dict:
        """With adaptive clipping the bounds, hence the noise, follow the live C: all of them
        are proportional to G_top = min(L, C)."""
        stds = self.noise_stddevs()
        if self._clip is None or self._clip.adaptive is None or not self.is_private:
            return stds
        loss_constant = self._loss_constant()
        traced_top = min(loss_constant, self.loss_gradient_clip)
        live_top = tf.minimum(loss_constant, self._clip.value)
        return {name: std * live_top / traced_top for name, std in stds.items()}

    def _loss_constant(self) -> float:
        return self.loss.lipschitz_constant(int(self.output_shape[-1]))

    def training_logits(self, x):
        """The logits as the train step differentiates them (loss-gradient clipping included)."""
        logits = self(x, training=True)
        return logits if self._clip is None else clip_row_gradients(logits, self._clip.value)

    def summed_gradients(self, x, y):
        adaptive = self._clip is not None and self._clip.adaptive is not None
        with tf.GradientTape(persistent=adaptive) as tape:
            logits = self.training_logits(x)  # the clipping is the identity forward
            summed_loss = tf.reduce_sum(self.compiled_loss(y, logits))  # reduction NONE: one per example
        gradients = tape.gradient(summed_loss, self.trainable_variables)
        if adaptive:
            # Row i: example i's own logit gradient, as it reaches the clip (what the count counts).
            self._logit_gradient_norms = tf.norm(tape.gradient(summed_loss, logits), axis=1)
        del tape
        return logits, gradients

    def train_step(self, data):
        metrics = super().train_step(data)
        if self._clip is not None and self._clip.adaptive is not None:
            self._clip.update(self._logit_gradient_norms, self._expected_batch_size, self._noise_generator,
                              ceiling=self._loss_constant())
        return metrics


def check_training_arrays(x, y, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of finite float32 inputs and labels in range, or a clear error."""
    if isinstance(x, tf.data.Dataset) or not hasattr(x, "shape") or y is None or not hasattr(y, "shape"):
        raise TypeError(
            "DP models train on arrays (x, y), not on ready-made datasets or generators: lipdp "
            "draws Poisson-sampled batches itself, which is what the privacy accountant assumes."
        )
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must hold the same, positive number of examples, got {len(x)} and {len(y)}.")
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values: clean the data before training (nothing was trained).")
    if not np.isfinite(np.linalg.norm(x.reshape(len(x), -1), axis=1)).all():
        raise ValueError("Some examples are so large that their norm overflows float32: rescale x (e.g. pixels / 255).")
    check_labels(y, num_classes)
    return x, y


def check_labels(y: np.ndarray, num_classes: int) -> None:
    """Integer labels in [0, K-1], or exact one-hot rows: the loss constants assume them."""
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        if not (np.isin(y, (0, 1)).all() and (y.sum(axis=1) == 1).all()):
            raise ValueError("One-hot labels must be rows of 0s with a single 1: the loss bounds assume it.")
        return
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
        raise ValueError(f"y must hold integer class labels (shape (N,)) or one-hot rows (shape (N, {num_classes})).")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"Labels must lie in [0, {num_classes - 1}] for a model with {num_classes} outputs, "
            f"got values from {y.min()} to {y.max()}."
        )
