"""Keras callbacks for private training."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from lipdp.accounting import BudgetExhaustedError, check_epsilon, max_steps
from lipdp.bounds import gradient_bounds, noise_to_signal, per_example_gradient_norms


class PrivacyBudget(tf.keras.callbacks.Callback):
    """Records epsilon after every epoch (``history.history["epsilon"]``) and stops
    training *before* a step would exceed the budget ``epsilon``.

    At the start of ``fit`` it computes, with the accountant, how many more steps fit the
    budget after what the model's ledger already holds, and stops right after the last
    one (Keras checks ``stop_training`` after each step, before the next). Its only state,
    the steps taken, lives in the model's ledger, which checkpoints save: a resumed run
    stops where the uninterrupted one would.
    """

    def __init__(self, epsilon: float, accountant: str = "pld", verbose: bool = True):
        super().__init__()
        self.epsilon = check_epsilon(epsilon)
        self.accountant = accountant
        self.verbose = verbose
        self.stopped_early = False
        self._last_allowed_step = None

    def _ledger(self):
        if not getattr(self.model, "is_private", False):
            raise TypeError("PrivacyBudget needs a private lipdp model (DPSequential with dp_parameters).")
        return self.model.privacy_ledger

    def on_train_begin(self, logs=None):
        ledger = self._ledger()
        parameters = self.model.dp_parameters
        if ledger.has_non_private_steps:
            raise BudgetExhaustedError("This model already trained without noise: no epsilon budget covers it.")
        sampling_rate, noise_multiplier = ledger.current_parameters()
        allowed = max_steps(
            self.epsilon, noise_multiplier, sampling_rate, parameters.delta,
            prior_event=ledger.dp_event(), accountant=self.accountant,
        )
        if allowed == 0:
            spent = ledger.statement(parameters.delta, self.accountant)
            raise BudgetExhaustedError(
                f"The privacy budget epsilon={self.epsilon} allows no further step: the model already "
                f"took {spent.steps} private steps (epsilon={spent.epsilon:.3g}). Train a new model, "
                "raise the budget, or use more noise."
            )
        self._last_allowed_step = ledger.steps + allowed
        self.stopped_early = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._ledger().steps < self._last_allowed_step:
            return
        self.model.stop_training = True
        planned_end = self._epoch == self.params["epochs"] - 1 and batch == self.params["steps"] - 1
        if not planned_end and not self.stopped_early:
            self.stopped_early = True
            if self.verbose:
                print(f"\nPrivacyBudget: stopping, the next step would exceed epsilon={self.epsilon}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["epsilon"] = self.model.privacy_statement(self.accountant).epsilon


class GradientMonitor(tf.keras.callbacks.Callback):
    """Per variable, every ``every`` epochs: per-example gradient norms on (x, y) against
    the bounds, the fraction of the bound used (max and median), and the signal-to-noise
    ratio of the averaged gradient (||mean gradient|| / expected noise norm).

    Give it held-out data. Computed on training data, these numbers are not covered by
    the privacy guarantee: pass ``on_training_data=True`` and they are labelled so.
    ``records`` holds one dict per measured epoch; ``latest_norms`` feeds the plots.
    """

    def __init__(self, x, y, every: int = 1, on_training_data: bool = False):
        super().__init__()
        self.x, self.y, self.every, self.on_training_data = x, y, every, on_training_data
        self.records: list[dict] = []
        self.latest_norms: dict | None = None

    @property
    def label(self) -> str:
        return "training data: not private" if self.on_training_data else "held-out data"

    def due(self, epoch: int) -> bool:
        last = epoch + 1 == self.params.get("epochs") or self.model.stop_training
        return (epoch + 1) % self.every == 0 or last

    def on_epoch_end(self, epoch, logs=None):
        if not self.due(epoch):
            return
        bounds = gradient_bounds(self.model)
        norms = per_example_gradient_norms(self.model, self.x, self.y)
        ratios = noise_to_signal(self.model, self.x, self.y, self.model._expected_batch_size)
        self.latest_norms = norms
        self.records.append({
            "epoch": epoch + 1,
            "data": self.label,
            "max_fraction_of_bound": {n: float(norms[n].max() / b) for n, b in bounds.items()},
            "median_fraction_of_bound": {n: float(np.median(norms[n]) / b) for n, b in bounds.items()},
            "signal_to_noise": {n: (1.0 / r if r else math.inf) for n, r in ratios.items()},
        })
