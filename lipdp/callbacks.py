"""Keras callbacks for private training."""

from __future__ import annotations

import tensorflow as tf

from lipdp.accounting import BudgetExhaustedError, check_epsilon, max_steps


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
