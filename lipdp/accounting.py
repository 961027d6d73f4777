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

from lipdp.quiet import quiet

ACCOUNTANTS = ("pld", "rdp")
NEIGHBOURING_RELATION = "add or remove one training example"
# Calibration does not go below this noise multiplier: smaller ones give epsilons in the
# hundreds, and PLD accounting slows down sharply there.
MIN_NOISE_MULTIPLIER = 0.3
CALIBRATION_TOLERANCE = 1e-4  # relative, on sigma; keeps epsilon within ~0.1 % below its target
SEARCH_DISCRETIZATION = 1e-3  # PLD grid for searches (dp_accounting's default: 1e-4)


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


def make_accountant(accountant: str = "pld", coarse: bool = False) -> dp_accounting.PrivacyAccountant:
    """A fresh dp_accounting accountant. ``coarse`` PLD uses a 10x coarser grid: still a
    valid upper bound on epsilon (pessimistic discretisation), 10x faster; searches use it
    and their answers are then checked on the default grid."""
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if check_accountant(accountant) == "pld":
        return pld.PLDAccountant(relation, value_discretization_interval=SEARCH_DISCRETIZATION if coarse else 1e-4)
    return rdp.RdpAccountant(neighboring_relation=relation)


def epsilon_of(event: dp_accounting.DpEvent, delta: float, accountant: str = "pld", coarse: bool = False) -> float:
    """epsilon of any DpEvent at this delta."""
    check_delta(delta)
    with quiet_rdp_warnings():
        return float(make_accountant(accountant, coarse).compose(event).get_epsilon(delta))


def quiet_rdp_warnings():
    """dp_accounting's RDP accountant logs a warning for every Renyi order it drops
    (harmless: the bound stays valid); keep them out of a learner's output."""
    return quiet("absl")


@functools.lru_cache(maxsize=4096)
def compute_epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str = "pld"
) -> float:
    """epsilon after ``steps`` Poisson-sampled Gaussian steps (cached: sliders repeat calls)."""
    event = dp_sgd_event(check_noise_multiplier(noise_multiplier), check_sampling_rate(sampling_rate), check_steps(steps))
    return epsilon_of(event, delta, accountant) if steps else 0.0


@functools.lru_cache(maxsize=1024)
def calibrate_noise_multiplier(
    target_epsilon: float, sampling_rate: float, steps: int, delta: float, accountant: str = "pld"
) -> float:
    """The smallest sigma whose epsilon is <= target, by dp_accounting.calibrate_dp_mechanism.

    The fast RDP accountant finds a first sigma (RDP epsilons are looser, so its sigma is
    larger); the PLD search then runs on the coarse grid between half of it and it. The
    result is checked on the default grid and nudged up until it passes: an unsafe sigma
    is never returned.
    """
    check_epsilon(target_epsilon)
    check_sampling_rate(sampling_rate)
    check_delta(delta)
    if check_steps(steps) == 0:
        raise ValueError("steps must be positive to calibrate a noise multiplier.")

    def event(sigma: float) -> dp_accounting.DpEvent:
        return dp_sgd_event(sigma, sampling_rate, steps)

    def search(kind: str, lower: float, guess: float) -> float:
        with quiet_rdp_warnings():
            return dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant(kind, coarse=True), event, target_epsilon, delta,
                bracket_interval=dp_accounting.LowerEndpointAndGuess(lower, guess), tol=CALIBRATION_TOLERANCE * guess,
            )

    if epsilon_of(event(MIN_NOISE_MULTIPLIER), delta, accountant, coarse=True) <= target_epsilon:
        raise ValueError(
            f"epsilon={target_epsilon} is reached even with sigma={MIN_NOISE_MULTIPLIER}; "
            "lipdp does not calibrate below that. Pass a noise multiplier directly instead."
        )
    sigma = search("rdp", MIN_NOISE_MULTIPLIER, 2 * MIN_NOISE_MULTIPLIER)
    if accountant == "pld":
        lower = max(MIN_NOISE_MULTIPLIER, sigma / 2)
        if epsilon_of(event(lower), delta, "pld", coarse=True) <= target_epsilon:
            lower = MIN_NOISE_MULTIPLIER  # epsilon(MIN) > target was checked above
        sigma = search("pld", lower, sigma)
    while compute_epsilon(sigma, sampling_rate, steps, delta, accountant) > target_epsilon:
        sigma *= 1 + CALIBRATION_TOLERANCE
    return float(sigma)


def epsilon_curve(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, points: int = 12
) -> tuple[list[int], list[float]]:
    """epsilon after 1..steps steps at ``points`` step counts, for plots. Uses the coarse
    PLD grid: still an upper bound on epsilon, ten times faster."""
    grid = sorted({max(1, round(steps * k / (points - 1))) for k in range(points)})
    return grid, [epsilon_of(dp_sgd_event(noise_multiplier, sampling_rate, t), delta, coarse=True) for t in grid]


def _largest_true(predicate, lower: int, upper: int) -> int:
    """Largest integer n in [lower, upper) with predicate(n), for a predicate that is
    true at ``lower``, false at ``upper`` and monotone in between (bisection)."""
    while upper - lower > 1:
        middle = (lower + upper) // 2
        lower, upper = (middle, upper) if predicate(middle) else (lower, middle)
    return lower


def max_steps(
    target_epsilon: float,
    noise_multiplier: float,
    sampling_rate: float,
    delta: float,
    prior_event: dp_accounting.DpEvent | None = None,
    accountant: str = "pld",
) -> int:
    """The largest T such that ``prior_event`` followed by T steps stays within epsilon.

    0 when not even one step fits. The search runs on the coarse grid, then the answer is
    refined by bisection on the default grid, so it is exact for the accountant used by
    :func:`compute_epsilon` (epsilon(T) <= target < epsilon(T + 1)).
    """
    check_epsilon(target_epsilon)
    check_noise_multiplier(noise_multiplier)
    check_sampling_rate(sampling_rate)
    prior = prior_event or dp_accounting.NoOpDpEvent()

    def fits(steps: int, coarse: bool = False) -> bool:
        event = dp_accounting.ComposedDpEvent([prior, dp_sgd_event(noise_multiplier, sampling_rate, steps)])
        return epsilon_of(event, delta, accountant, coarse) <= target_epsilon

    if not fits(1):
        return 0
    upper = 2
    while fits(upper, coarse=True):
        upper *= 2
        if upper > 2**40:
            raise ValueError("The budget allows practically unlimited steps: check epsilon and sigma.")
    guess = _largest_true(lambda t: fits(t, coarse=True), max(1, upper // 2) if upper > 2 else 1, upper)
    if not fits(guess):
        return _largest_true(fits, 1, guess)
    step = max(1, guess // 100)
    while fits(guess + step):
        guess, step = guess + step, 2 * step
    return _largest_true(fits, guess, guess + step)


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
    """What a model has released: training steps, grouped in segments of equal (q, sigma);
    sigma = 0 marks steps taken without noise.

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

    @property
    def has_non_private_steps(self) -> bool:
        """Steps taken without noise (sigma recorded as 0): no epsilon covers them."""
        return any(sigma == 0 for _, sigma, _ in self.segments)

    def dp_event(self) -> dp_accounting.DpEvent:
        if self.has_non_private_steps:
            return dp_accounting.NonPrivateDpEvent()
        return dp_accounting.ComposedDpEvent([dp_sgd_event(s, q, t) for q, s, t in self.segments])

    def statement(self, delta: float, accountant: str = "pld") -> PrivacyStatement:
        segments = self.segments
        if self.has_non_private_steps:
            epsilon = math.inf
        else:
            epsilon = epsilon_of(self.dp_event(), delta, accountant) if segments else 0.0
        return PrivacyStatement(epsilon, delta, segments, accountant)
