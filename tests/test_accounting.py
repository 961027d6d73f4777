"""lipdp.accounting against direct dp_accounting computations (DESIGN §4).

Every expected epsilon here is computed in the test itself, straight from
dp_accounting, never through lipdp's own helpers.
"""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

import lipdp  # noqa: F401  (switches to legacy Keras before tensorflow is used)
from lipdp import accounting

RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def direct_accountant(accountant: str):
    if accountant == "pld":
        return pld.PLDAccountant(RELATION)
    assert accountant == "rdp"
    return rdp.RdpAccountant(neighboring_relation=RELATION)


def direct_sgd_event(sigma, q, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def direct_epsilon(sigma, q, steps, delta, accountant="pld", prior=None):
    event = direct_sgd_event(sigma, q, steps)
    if prior is not None:
        event = dp_accounting.ComposedDpEvent([prior, event])
    return direct_accountant(accountant).compose(event).get_epsilon(delta)


# ------------------------------------------------------------------ compute_epsilon
SETTINGS = [
    # sigma, q, steps, delta
    (1.1, 0.00427, 1000, 1e-5),  # DESIGN §4's example
    (0.8, 0.01, 200, 1e-5),
    (2.0, 0.1, 50, 1e-6),
    (1.5, 0.3561, 15, 1e-5),
    (4.0, 1.0, 10, 1e-5),  # q = 1: full batch, no amplification
]


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("sigma, q, steps, delta", SETTINGS)
def test_compute_epsilon_matches_dp_accounting(sigma, q, steps, delta, accountant):
    expected = direct_epsilon(sigma, q, steps, delta, accountant)
    got = accounting.compute_epsilon(sigma, q, steps, delta, accountant)
    assert got == pytest.approx(expected, rel=1e-6)
    assert isinstance(got, float)


def test_compute_epsilon_defaults_to_pld():
    assert accounting.compute_epsilon(1.1, 0.00427, 1000, 1e-5) == pytest.approx(
        direct_epsilon(1.1, 0.00427, 1000, 1e-5, "pld"), rel=1e-6
    )


def test_design_example_values_and_pld_tighter_than_rdp():
    q, sigma, steps, delta = 0.00427, 1.1, 1000, 1e-5
    eps_pld = accounting.compute_epsilon(sigma, q, steps, delta, "pld")
    eps_rdp = accounting.compute_epsilon(sigma, q, steps, delta, "rdp")
    assert eps_pld == pytest.approx(0.60, abs=0.01)
    assert eps_rdp == pytest.approx(0.89, abs=0.01)
    assert eps_pld <= eps_rdp


@pytest.mark.parametrize("sigma, q, steps, delta", SETTINGS[1:4])
def test_pld_never_looser_than_rdp(sigma, q, steps, delta):
    assert accounting.compute_epsilon(sigma, q, steps, delta, "pld") <= accounting.compute_epsilon(
        sigma, q, steps, delta, "rdp"
    )


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    eps = [accounting.compute_epsilon(1.0, 0.05, t, 1e-5, "rdp") for t in (10, 20, 40)]
    assert eps[0] < eps[1] < eps[2]
    assert accounting.compute_epsilon(2.0, 0.05, 40, 1e-5, "rdp") < eps[2]


def test_zero_steps_costs_nothing():
    assert accounting.compute_epsilon(1.0, 0.05, 0, 1e-5) == pytest.approx(0.0, abs=1e-9)


# -------------------------------------------------------------------- calibration
CALIBRATION_Q, CALIBRATION_STEPS, CALIBRATION_DELTA = 0.05, 100, 1e-5


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("target", [0.5, 1.0, 3.0, 8.0])
def test_calibrated_sigma_meets_target_tightly(target, accountant):
    sigma = accounting.calibrate_noise_multiplier(
        target, CALIBRATION_Q, CALIBRATION_STEPS, CALIBRATION_DELTA, accountant
    )
    assert sigma >= accounting.MIN_NOISE_MULTIPLIER
    eps = direct_epsilon(sigma, CALIBRATION_Q, CALIBRATION_STEPS, CALIBRATION_DELTA, accountant)
    assert eps <= target
    assert eps >= 0.99 * target, f"sigma={sigma} is needlessly large: epsilon {eps} for target {target}"


def test_calibration_depends_on_accountant():
    # RDP is looser, so it needs more noise for the same target.
    sigma_pld = accounting.calibrate_noise_multiplier(3.0, CALIBRATION_Q, CALIBRATION_STEPS, CALIBRATION_DELTA, "pld")
    sigma_rdp = accounting.calibrate_noise_multiplier(3.0, CALIBRATION_Q, CALIBRATION_STEPS, CALIBRATION_DELTA, "rdp")
    assert sigma_pld < sigma_rdp


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibration_refuses_targets_below_min_noise(accountant):
    q, steps, delta = 0.01, 10, 1e-5
    # Reachable with sigma = MIN_NOISE_MULTIPLIER already: a smaller sigma would do.
    eps_at_min = direct_epsilon(accounting.MIN_NOISE_MULTIPLIER, q, steps, delta, accountant)
    with pytest.raises(ValueError, match="sigma"):
        accounting.calibrate_noise_multiplier(eps_at_min * 1.5, q, steps, delta, accountant)


def test_calibration_refuses_zero_steps():
    with pytest.raises(ValueError, match="steps"):
        accounting.calibrate_noise_multiplier(3.0, 0.05, 0, 1e-5)


# ---------------------------------------------------------------- max_steps, epochs
@pytest.mark.parametrize(
    "target, sigma, q, delta, accountant",
    [
        (3.0, 1.0, 0.05, 1e-5, "rdp"),
        (3.0, 1.5, 256 / 1438, 1e-5, "pld"),
        (2.0, 1.0, 0.05, 1e-5, "rdp"),
        (8.0, 1.2, 0.02, 1e-6, "rdp"),
    ],
)
def test_max_steps_is_exactly_the_last_step_that_fits(target, sigma, q, delta, accountant):
    steps = accounting.max_steps(target, sigma, q, delta, accountant=accountant)
    assert isinstance(steps, int) and steps > 0
    assert direct_epsilon(sigma, q, steps, delta, accountant) <= target
    assert direct_epsilon(sigma, q, steps + 1, delta, accountant) > target


def test_max_steps_zero_when_not_one_step_fits():
    sigma, q, delta = 1.0, 0.05, 1e-5
    one_step = direct_epsilon(sigma, q, 1, delta)
    assert accounting.max_steps(one_step * 0.9, sigma, q, delta) == 0
    # and exactly one step when the budget is just that one step
    assert accounting.max_steps(one_step * 1.0001, sigma, q, delta) == 1


def test_max_steps_accounts_the_prior_event():
    target, sigma, q, delta = 3.0, 1.0, 0.05, 1e-5
    # A prior release with different parameters (another training segment).
    prior = direct_sgd_event(2.0, 0.2, 20)
    alone = accounting.max_steps(target, sigma, q, delta, accountant="rdp")
    after = accounting.max_steps(target, sigma, q, delta, prior_event=prior, accountant="rdp")
    assert 0 < after < alone
    assert direct_epsilon(sigma, q, after, delta, "rdp", prior=prior) <= target
    assert direct_epsilon(sigma, q, after + 1, delta, "rdp", prior=prior) > target


def test_max_steps_zero_when_prior_already_exceeds_budget():
    prior = direct_sgd_event(0.8, 0.2, 50)
    assert direct_accountant("pld").compose(prior).get_epsilon(1e-5) > 3.0
    assert accounting.max_steps(3.0, 1.0, 0.05, 1e-5, prior_event=prior) == 0


@pytest.mark.parametrize("steps_per_epoch", [6, 7, 20])
def test_max_epochs_counts_whole_epochs(steps_per_epoch):
    target, sigma, q, delta = 3.0, 1.0, 0.05, 1e-5
    epochs = accounting.max_epochs(target, sigma, q, delta, steps_per_epoch, accountant="rdp")
    assert epochs >= 1
    assert direct_epsilon(sigma, q, epochs * steps_per_epoch, delta, "rdp") <= target
    assert direct_epsilon(sigma, q, (epochs + 1) * steps_per_epoch, delta, "rdp") > target


def test_max_epochs_zero_when_not_one_epoch_fits():
    target, sigma, q, delta = 3.0, 1.0, 0.05, 1e-5
    steps = accounting.max_steps(target, sigma, q, delta, accountant="rdp")
    assert accounting.max_epochs(target, sigma, q, delta, steps + 1, accountant="rdp") == 0


# ------------------------------------------------------------------ per-layer noise
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.7])
@pytest.mark.parametrize("layers", [1, 2, 4, 9])
def test_per_layer_noise_multiplier_equal_layers(sigma, layers):
    assert accounting.per_layer_noise_multiplier([sigma] * layers) == pytest.approx(sigma / math.sqrt(layers), rel=1e-12)


@pytest.mark.parametrize(
    "sigmas, expected",
    [
        ([1.0, 2.0], 1 / math.sqrt(1 + 1 / 4)),  # 0.894427...
        ([1.0, 1.0, 2.0], 1 / 1.5),
        ([3.0, 4.0], 1 / math.sqrt(1 / 9 + 1 / 16)),  # = 12/5
        ([2.0], 2.0),
    ],
)
def test_per_layer_noise_multiplier_formula(sigmas, expected):
    assert accounting.per_layer_noise_multiplier(sigmas) == pytest.approx(expected, rel=1e-12)
    assert accounting.per_layer_noise_multiplier(sigmas) <= min(sigmas)


def test_per_layer_noise_multiplier_sqrt_k_recovers_sigma():
    # model.py adds sigma * sqrt(K) * Delta_k per variable: it must compose back to sigma.
    sigma, k = 1.3, 7
    assert accounting.per_layer_noise_multiplier([sigma * math.sqrt(k)] * k) == pytest.approx(sigma, rel=1e-12)


# ---------------------------------------------------------------------- bad inputs
GOOD = dict(sigma=1.0, q=0.05, steps=10, delta=1e-5, epsilon=3.0)
BAD_INPUTS = [
    ("epsilon", 0.0, "epsilon"),
    ("epsilon", -1.0, "epsilon"),
    ("epsilon", float("nan"), "epsilon"),
    ("epsilon", float("inf"), "epsilon"),
    ("delta", 0.0, "delta"),
    ("delta", 1.0, "delta"),
    ("delta", -1e-5, "delta"),
    ("delta", float("nan"), "delta"),
    ("sigma", 0.0, "noise_multiplier"),
    ("sigma", -1.0, "noise_multiplier"),
    ("sigma", float("nan"), "noise_multiplier"),
    ("q", 0.0, "sampling rate"),
    ("q", 1.5, "sampling rate"),
    ("q", -0.1, "sampling rate"),
    ("steps", -1, "steps"),
    ("steps", 2.5, "steps"),
]


@pytest.mark.parametrize("name, value, message", [b for b in BAD_INPUTS if b[0] != "epsilon"])
def test_compute_epsilon_rejects_bad_inputs(name, value, message):
    args = dict(GOOD, **{name: value})
    with pytest.raises(ValueError, match=message):
        accounting.compute_epsilon(args["sigma"], args["q"], args["steps"], args["delta"])


@pytest.mark.parametrize("name, value, message", [b for b in BAD_INPUTS if b[0] != "sigma"])
def test_calibrate_rejects_bad_inputs(name, value, message):
    args = dict(GOOD, **{name: value})
    with pytest.raises(ValueError, match=message):
        accounting.calibrate_noise_multiplier(args["epsilon"], args["q"], args["steps"], args["delta"])


@pytest.mark.parametrize("name, value, message", [b for b in BAD_INPUTS if b[0] != "steps"])
def test_max_steps_rejects_bad_inputs(name, value, message):
    args = dict(GOOD, **{name: value})
    with pytest.raises(ValueError, match=message):
        accounting.max_steps(args["epsilon"], args["sigma"], args["q"], args["delta"], accountant="rdp")


def test_unknown_accountant_rejected():
    with pytest.raises(ValueError, match="accountant"):
        accounting.compute_epsilon(1.0, 0.05, 10, 1e-5, "moments")


def test_error_messages_are_helpful():
    with pytest.raises(ValueError) as info:
        accounting.compute_epsilon(1.0, 2.0, 10, 1e-5)
    assert "2.0" in str(info.value)  # names the offending value


# ----------------------------------------------------------------------- statement
def test_privacy_statement_repr_is_a_readable_sentence():
    statement = accounting.PrivacyStatement(0.6, 1e-5, ((0.00427, 1.1, 1000),))
    text = repr(statement)
    assert "0.6" in text
    assert "1e-05" in text
    assert "add or remove" in text
    assert "Poisson" in text
    assert "1000 steps" in text
    assert "PrivacyStatement(" not in text  # not the dataclass default repr
    assert text.endswith(".")
    assert statement.steps == 1000


def test_privacy_statement_with_several_segments_and_none():
    statement = accounting.PrivacyStatement(2.5, 1e-6, ((0.01, 1.0, 100), (0.02, 2.0, 50)), accountant="rdp")
    assert statement.steps == 150
    text = repr(statement)
    assert "100 steps" in text and "50 steps" in text and "RDP" in text
    assert "no private steps" in repr(accounting.PrivacyStatement(0.0, 1e-5, ()))


# -------------------------------------------------------------------------- ledger
def test_ledger_segments_and_composition():
    ledger = accounting.PrivacyLedger()
    assert ledger.segments == () and ledger.steps == 0
    with pytest.raises(RuntimeError):
        ledger.current_parameters()
    empty = ledger.statement(1e-5)
    assert empty.epsilon == 0.0 and empty.steps == 0

    ledger.begin(0.05, 1.0)
    for _ in range(3):
        ledger.record_step()
    assert ledger.segments == ((0.05, 1.0, 3),)
    assert ledger.current_parameters() == (0.05, 1.0)

    # Same (q, sigma): the same segment continues.
    ledger.begin(0.05, 1.0)
    for _ in range(2):
        ledger.record_step()
    assert ledger.segments == ((0.05, 1.0, 5),)
    assert int(ledger.num_segments.numpy()) == 1

    # New (q, sigma): a new segment.
    ledger.begin(0.2, 2.0)
    for _ in range(4):
        ledger.record_step()
    assert ledger.segments == ((0.05, 1.0, 5), (0.2, 2.0, 4))
    assert ledger.steps == 9
    assert ledger.current_parameters() == (0.2, 2.0)

    expected = direct_accountant("pld").compose(
        dp_accounting.ComposedDpEvent([direct_sgd_event(1.0, 0.05, 5), direct_sgd_event(2.0, 0.2, 4)])
    ).get_epsilon(1e-5)
    assert accounting.epsilon_of(ledger.dp_event(), 1e-5) == pytest.approx(expected, rel=1e-6)
    statement = ledger.statement(1e-5)
    assert statement.epsilon == pytest.approx(expected, rel=1e-6)
    assert statement.steps == 9
    assert statement.segments == ((0.05, 1.0, 5), (0.2, 2.0, 4))

    rdp_expected = direct_accountant("rdp").compose(
        dp_accounting.ComposedDpEvent([direct_sgd_event(1.0, 0.05, 5), direct_sgd_event(2.0, 0.2, 4)])
    ).get_epsilon(1e-5)
    assert ledger.statement(1e-5, "rdp").epsilon == pytest.approx(rdp_expected, rel=1e-6)


def test_ledger_single_segment_equals_compute_epsilon_of_direct_event():
    ledger = accounting.PrivacyLedger()
    ledger.begin(0.1, 1.5)
    for _ in range(7):
        ledger.record_step()
    assert ledger.statement(1e-5).epsilon == pytest.approx(direct_epsilon(1.5, 0.1, 7, 1e-5), rel=1e-6)


def test_ledger_empty_segment_is_not_reported():
    ledger = accounting.PrivacyLedger()
    ledger.begin(0.1, 1.5)
    ledger.record_step()
    ledger.begin(0.3, 1.0)  # opened, never used
    assert ledger.segments == ((0.1, 1.5, 1),)
    ledger.begin(0.1, 1.5)  # back to the first parameters: a new segment after the empty one
    ledger.record_step()
    assert ledger.steps == 2
    assert ledger.statement(1e-5).epsilon == pytest.approx(
        direct_accountant("pld").compose(
            dp_accounting.ComposedDpEvent([direct_sgd_event(1.5, 0.1, 1), direct_sgd_event(1.5, 0.1, 1)])
        ).get_epsilon(1e-5),
        rel=1e-6,
    )


def test_ledger_refuses_too_many_segments():
    ledger = accounting.PrivacyLedger()
    for i in range(accounting.PrivacyLedger.MAX_SEGMENTS):
        ledger.begin(0.1, 1.0 + i)
    ledger.begin(0.1, 1.0 + accounting.PrivacyLedger.MAX_SEGMENTS - 1)  # continuing is fine
    with pytest.raises(RuntimeError):
        ledger.begin(0.1, 0.5)
