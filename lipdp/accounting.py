"""Privacy accounting on dp_accounting: epsilon, calibration, budgets and the ledger.

One private step samples each training example independently with probability q
(Poisson sampling, see :mod:`lipdp.sampling`) and adds Gaussian noise of standard
deviation sigma * C, C being the bound on one example's gradient norm. dp_accounting
models that as ``PoissonSampledDpEvent(q, GaussianDpEvent(sigma))``; T steps are that
event self-composed T times. The neighbouring relation is *add or remove one example*
(dp_accounting's ``ADD_OR_REMOVE_ONE``), the one Poisson sampling analyses.

The PLD accountant is the default (tighter); RDP is offered as a cross-check. Nothing
here re-implements either: lipdp only builds events and searches over parameters.
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import dp_accounting
import tensorflow as tf
from dp_accounting import pld, rdp

ACCOUNTANTS = ("pld", "rdp")
NEIGHBOURING_RELATION = "add or remove one training example"
# Calibration does not go below this noise multiplier: smaller ones give epsilons in the
# hundreds, and PLD accounting slows down sharply there.
MIN_NOISE_MULTIPLIER = 0.3
CALIBRATION_TOLERANCE = 1e-4  # on sigma; keeps epsilon within ~0.1 % below its target


class BudgetExhaustedError(RuntimeError):
    """The privacy budget does not allow a single further step."""


# ------------------------------------------------------------------------ validation
def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_epsilon(epsilon: float) -> float:
    if not (_is_real(epsilon) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}. Typical values: 1 to 10.")
    return float(epsilon)


def check_delta(delta: float) -> float:
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must lie strictly between 0 and 1, got {delta!r}. Use a value below 1/N, e.g. 1e-5.")
    return float(delta)


def check_noise_multiplier(noise_multiplier: float) -> float:
    if not (_is_real(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(
            f"noise_multiplier (sigma) must be a positive number, got {noise_multiplier!r}. "
            "For training without privacy, build the model with dp_parameters=None."
        )
    return float(noise_multiplier)


def check_sampling_rate(sampling_rate: float) -> float:
    if not (_is_real(sampling_rate) and 0 < sampling_rate <= 1):
        raise ValueError(
            f"sampling rate q must lie in (0, 1], got {sampling_rate!r}: q = expected batch size / "
            "number of training examples, so the expected batch size cannot exceed the dataset."
        )
    return float(sampling_rate)


def check_steps(steps: int) -> int:
    if not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= 0):
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
    return int(steps)


def check_accountant(accountant: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    return accountant


# -------------------------------------------------------------------- events, epsilon
def dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """T steps of Poisson-sampled Gaussian noise (the clipless and the clipped step alike)."""
    step = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def per_layer_noise_multiplier(layer_noise_multipliers) -> float:
    """Noise sigma_k * Delta_k on each layer k is one Gaussian mechanism on the whole
    gradient with sigma_eff = (sum_k sigma_k^-2)^(-1/2) (rescale each block by its noise)."""
    return sum(float(s) ** -2 for s in layer_noise_multipliers) ** -0.5


def make_accountant(accountant: str = "pld") -> dp_accounting.PrivacyAccountant:
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if check_accountant(accountant) == "pld":
        return pld.PLDAccountant(relation)
    return rdp.RdpAccountant(neighboring_relation=relation)


def epsilon_of(event: dp_accounting.DpEvent, delta: float, accountant: str = "pld") -> float:
    """epsilon of any DpEvent at this delta."""
    return float(make_accountant(accountant).compose(event).get_epsilon(check_delta(delta)))


@functools.lru_cache(maxsize=4096)
def compute_epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "pld"
) -> float:
    """epsilon after ``steps`` Poisson-sampled Gaussian steps (cached: sliders repeat calls)."""
    event = dp_sgd_event(check_noise_multiplier(noise_multiplier), check_sampling_rate(sampling_rate), check_steps(steps))
    return epsilon_of(event, delta, accountant)


@functools.lru_cache(maxsize=1024)
def calibrate_noise_multiplier(
    target_epsilon: float, sampling_rate: float, steps: int, delta: float, accountant: str = "pld"
) -> float:
    """The smallest sigma whose epsilon is <= target (dp_accounting.calibrate_dp_mechanism).

    The result is checked once more: an unsafe sigma is never returned.
    """
    check_epsilon(target_epsilon)
    check_sampling_rate(sampling_rate)
    check_delta(delta)
    if check_steps(steps) == 0:
        raise ValueError("steps must be positive to calibrate a noise multiplier.")
    if compute_epsilon(MIN_NOISE_MULTIPLIER, sampling_rate, steps, delta, accountant) <= target_epsilon:
        raise ValueError(
            f"epsilon={target_epsilon} is reached even with sigma={MIN_NOISE_MULTIPLIER}; "
            "lipdp does not calibrate below that. Pass a noise multiplier directly instead."
        )
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant),
        lambda s: dp_sgd_event(s, sampling_rate, steps),
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(MIN_NOISE_MULTIPLIER, 2 * MIN_NOISE_MULTIPLIER),
        tol=CALIBRATION_TOLERANCE,
    )
    if compute_epsilon(sigma, sampling_rate, steps, delta, accountant) > target_epsilon:
        raise RuntimeError(f"Calibration returned sigma={sigma} whose epsilon exceeds {target_epsilon}; refusing it.")
    return float(sigma)


def max_steps(
    target_epsilon: float,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    prior_event: dp_accounting.DpEvent | None = None,
    accountant: str = "pld",
) -> int:
    """The largest T such that ``prior_event`` followed by T steps stays within epsilon.

    0 when not even one step fits. dp_accounting.calibrate_dp_mechanism searches over the
    integer T; the answer is then verified at T and T + 1, so it is exact.
    """
    check_epsilon(target_epsilon)
    check_noise_multiplier(noise_multiplier)
    check_sampling_rate(sampling_rate)
    prior = prior_event or dp_accounting.NoOpDpEvent()

    def event(steps: int) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent([prior, dp_sgd_event(noise_multiplier, sampling_rate, steps)])

    def fits(steps: int) -> bool:
        return epsilon_of(event(steps), delta, accountant) <= target_epsilon

    if not fits(1):
        return 0
    upper = 2
    while fits(upper):  # a bracket [upper/2, upper]
        upper *= 2
        if upper > 2**40:
            raise ValueError("The budget allows practically unlimited steps: check epsilon and sigma.")
    steps = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant),
        event,
        target_epsilon,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(upper // 2, upper),
        discrete=True,
    )
    while not fits(steps):
        steps -= 1
    while fits(steps + 1):
        steps += 1
    return steps


def max_epochs(
    target_epsilon: float, noise_multiplier: float, sampling_rate: float, delta: float,
    steps_per_epoch: int, accountant: str = "pld",
) -> int:
    """The largest number of whole epochs that fits the budget."""
    return max_steps(target_epsilon, noise_multiplier, sampling_rate, delta, accountant=accountant) // steps_per_epoch


# ------------------------------------------------------------------ statement, ledger
@dataclass(frozen=True)
class PrivacyStatement:
    """What a training run guarantees, in one sentence (its repr)."""

    epsilon: float
    delta: float
    segments: tuple  # ((sampling_rate, noise_multiplier, steps), ...)
    accountant: str = "pld"
    neighbouring_relation: str = NEIGHBOURING_RELATION
    sampling: str = "Poisson sampling"

    @property
    def steps(self) -> int:
        return sum(steps for _, _, steps in self.segments)

    def __repr__(self) -> str:
        runs = "; then ".join(
            f"{steps} steps at sampling rate q = {q:.4g} with noise multiplier sigma = {sigma:.4g}"
            for q, sigma, steps in self.segments
        ) or "no private steps"
        return (
            f"({self.epsilon:.3g}, {self.delta:.3g})-DP with respect to {self.neighbouring_relation}: "
            f"{runs} ({self.sampling} of each example, {self.accountant.upper()} accountant)."
        )


class PrivacyLedger(tf.Module):
    """What a model has released: private steps, grouped in segments of equal (q, sigma).

    Stored in variables, so checkpoints of the model carry it, and a resumed run reports
    the epsilon of the uninterrupted one. ``record_step`` runs inside the train step.
    """

    MAX_SEGMENTS = 64

    def __init__(self):
        super().__init__(name="privacy_ledger")
        self.segment_parameters = tf.Variable(tf.zeros((self.MAX_SEGMENTS, 2), tf.float64), trainable=False)
        self.segment_steps = tf.Variable(tf.zeros((self.MAX_SEGMENTS,), tf.int64), trainable=False)
        self.num_segments = tf.Variable(0, dtype=tf.int64, trainable=False)

    def begin(self, sampling_rate: float, noise_multiplier: float) -> None:
        """Open a segment for (q, sigma), or continue the last one if it matches."""
        count = int(self.num_segments.numpy())
        if count and tuple(self.segment_parameters[count - 1].numpy()) == (sampling_rate, noise_multiplier):
            return
        if count == self.MAX_SEGMENTS:
            raise RuntimeError(f"The ledger holds at most {self.MAX_SEGMENTS} changes of (q, sigma).")
        self.segment_parameters[count].assign([sampling_rate, noise_multiplier])
        self.num_segments.assign(count + 1)

    def current_parameters(self) -> tuple[float, float]:
        """(q, sigma) of the open segment."""
        count = int(self.num_segments.numpy())
        if count == 0:
            raise RuntimeError("The ledger has no open segment: fit() opens one.")
        q, sigma = self.segment_parameters[count - 1].numpy()
        return float(q), float(sigma)

    def record_step(self) -> None:
        self.segment_steps.scatter_nd_add([[self.num_segments - 1]], tf.ones([1], tf.int64))

    @property
    def segments(self) -> tuple:
        count = int(self.num_segments.numpy())
        parameters, steps = self.segment_parameters.numpy()[:count], self.segment_steps.numpy()[:count]
        return tuple((float(q), float(s), int(t)) for (q, s), t in zip(parameters, steps) if t > 0)

    @property
    def steps(self) -> int:
        return int(self.segment_steps.numpy().sum())

    def dp_event(self) -> dp_accounting.DpEvent:
        return dp_accounting.ComposedDpEvent([dp_sgd_event(s, q, t) for q, s, t in self.segments])

    def statement(self, delta: float, accountant: str = "pld") -> PrivacyStatement:
        segments = self.segments
        epsilon = epsilon_of(self.dp_event(), delta, accountant) if segments else 0.0
        return PrivacyStatement(epsilon, delta, segments, accountant)
