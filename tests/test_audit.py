"""Membership-inference audits: the statistics, the DP bound, and real attacks on real models."""

import math

import dp_accounting
import numpy as np
import pytest
from scipy import stats

import lipdp
from lipdp import audit

POOL = 128  # a tiny pool: the non-private model memorises its (about 64) members
EPOCHS = 150


# ------------------------------------------------------------------------ statistics
def test_empirical_epsilon_formula():
    assert audit.empirical_epsilon(0.5, 0.1, 1e-12) == pytest.approx(math.log(5))
    assert audit.empirical_epsilon(0.99, 0.5, 1e-12) == pytest.approx(math.log(0.5 / 0.01))  # the flipped test
    assert audit.empirical_epsilon(0.5, 0.1, 0.1) == pytest.approx(math.log(4))  # delta pays first
    assert audit.empirical_epsilon(0.2, 0.2, 1e-5) == 0.0  # chance: no evidence
    assert audit.empirical_epsilon(0.3, 0.0, 1e-5) == math.inf


def test_dp_bound_is_the_gaussian_mechanisms_tangent():
    """The optimal test against a Gaussian mechanism (TPR = Phi(Phi^-1(FPR) + 1/sigma)) stays
    under the (eps, delta) bound the accountant gives it, and touches it: the bound is tight."""
    sigma, delta = 1.5, 1e-5
    epsilon = dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(sigma)).get_epsilon(delta)
    fpr = np.geomspace(1e-9, 1 - 1e-9, 20001)
    optimal = stats.norm.cdf(stats.norm.ppf(fpr) + 1 / sigma)
    gap = audit.dp_tpr_bound(fpr, epsilon, delta) - optimal
    assert gap.min() >= -1e-6
    assert gap.min() <= 1e-4


def test_dp_auc_bound():
    assert audit.dp_auc_bound(1.0, 0.0) == pytest.approx(math.e / (1 + math.e), abs=1e-6)
    assert audit.dp_auc_bound(1.0, 1e-5) == pytest.approx(math.e / (1 + math.e), abs=1e-4)
    assert audit.dp_auc_bound(0.01, 0.0) == pytest.approx(0.5025, abs=1e-4)


def test_clopper_pearson_known_values():
    assert audit.clopper_pearson(0, 100, 0.05) == (0.0, pytest.approx(1 - 0.05 ** (1 / 100)))
    assert audit.clopper_pearson(100, 100, 0.05) == (pytest.approx(0.05 ** (1 / 100)), 1.0)
    lower, upper = audit.clopper_pearson(30, 100, 0.025)
    assert lower < 0.3 < upper
    assert stats.binom.sf(29, 100, lower) == pytest.approx(0.025, rel=1e-6)  # P(X >= 30 | lower) = alpha


def test_perfect_attack_on_the_test_sample_sizes_can_prove_more_than_epsilon_one():
    """Otherwise 'stays within epsilon = 1' below could never fail."""
    members = np.arange(POOL) < POOL // 2
    result = audit.audit_scores(members.astype(float), members)
    assert result.auc == 1.0 and all(point.tpr == 1.0 and point.fpr == 0.0 for point in result.points)
    alpha = 0.05 / 4  # two rates at two points
    fpr_upper = 1 - alpha ** (1 / (POOL // 2))
    assert result.epsilon_lower_bound == pytest.approx(math.log((alpha ** (1 / (POOL // 2)) - 1e-5) / fpr_upper))
    assert result.epsilon_lower_bound > 2.0
    assert result.best_point.epsilon == math.inf


def test_random_scores_show_no_leak():
    rng = np.random.default_rng(0)
    members = rng.permutation(2000) < 1000
    result = audit.audit_scores(rng.normal(size=2000), members)
    low, high = result.auc_interval
    assert low < 0.5 < high and high - low < 0.1
    assert result.epsilon_lower_bound == 0.0


def test_operating_points_respect_the_target_fpr():
    rng = np.random.default_rng(1)
    members = rng.permutation(4000) < 2000
    result = audit.audit_scores(rng.normal(size=4000) + members, members)  # a real but weak signal
    for point in result.points:
        assert point.fpr <= point.target_fpr and 0 < point.tpr < 1
        assert point.epsilon_lower <= point.epsilon
    report = result.as_dict()
    assert {"auc", "tpr_at_fpr_1pct", "tpr_at_fpr_0.1pct", "empirical_epsilon_lower_bound"} <= set(report)
    assert report["tpr_at_fpr_1pct"] >= report["tpr_at_fpr_0.1pct"]


def test_membership_is_an_independent_coin_per_example():
    """Add-or-remove neighbours per example, which is what epsilon bounds: the member count
    varies from split to split (exact halves would make each in/out pair a swap)."""
    rng = np.random.default_rng(3)
    splits = np.array([audit.membership_split(100, rng) for _ in range(400)])
    assert len(set(splits.sum(axis=1))) > 5
    assert np.abs(splits.mean(axis=0) - 0.5).max() < 0.15
    # given the other coins, an example's coin is still fair (with exact halves it is not)
    others = splits[:, 1:].sum(axis=1)
    assert abs(splits[others >= 50, 0].mean() - 0.5) < 0.15


def test_lira_uses_the_unbiased_pooled_variance():
    """With 2 shadows in per example, the per-example mean absorbs one degree of freedom: the
    pooled variance divides by sum_i (n_i - 1), not by the number of scores."""
    inside = np.array([[True, False], [False, True], [True, False], [False, True]])
    shadow = np.array([[1.0, 10.0], [5.0, 20.0], [3.0, 14.0], [7.0, 26.0]])
    target = np.array([2.0, 25.0])
    mean_in, mean_out = np.array([2.0, 23.0]), np.array([6.0, 12.0])
    std_in = math.sqrt((1 + 1 + 9 + 9) / 2)  # deviations (1, 1) and (3, 3); 2 degrees of freedom
    std_out = math.sqrt((1 + 1 + 4 + 4) / 2)
    expected = stats.norm.logpdf(target, mean_in, std_in) - stats.norm.logpdf(target, mean_out, std_out)
    np.testing.assert_allclose(audit.lira_scores(target, shadow, inside), expected)


def test_lira_separates_synthetic_members():
    rng = np.random.default_rng(2)
    n, k = 400, 8
    inside = audit.complementary_splits(n, k, rng)
    assert np.all(inside.sum(axis=0) == k // 2)
    base = rng.normal(size=n)  # each example's own difficulty: LiRA calibrates it away
    shadow = base + 0.3 * inside + 0.1 * rng.normal(size=(k, n))
    members = audit.membership_split(n, rng)
    target = base + 0.3 * members + 0.1 * rng.normal(size=n)
    assert audit.audit_scores(audit.lira_scores(target, shadow, inside), members).auc > 0.9
    assert audit.audit_scores(target, members).auc < 0.75  # the raw statistic is much weaker


@pytest.mark.parametrize("call, message", [
    (lambda: audit.audit_scores(np.ones(3), np.array([True, False])), "same length"),
    (lambda: audit.audit_scores(np.ones(2), np.array([1, 0])), "boolean"),
    (lambda: audit.audit_scores(np.ones(2), np.array([True, True])), "both members and non-members"),
    (lambda: audit.audit_scores(np.array([1.0, np.nan]), np.array([True, False])), "NaN"),
    (lambda: audit.audit_scores(np.ones(2), np.array([True, False]), target_fprs=(0.0,)), "strictly between 0 and 1"),
    (lambda: audit.audit_scores(np.ones(2), np.array([True, False]), target_fprs=(1.5,)), "strictly between 0 and 1"),
    (lambda: audit.audit_scores(np.ones(2), np.array([True, False]), confidence=1.0), "confidence"),
    (lambda: audit.audit_scores(np.ones(2), np.array([True, False]), delta=0.0), "delta"),
    (lambda: audit.empirical_epsilon(1.2, 0.1, 1e-5), "tpr"),
    (lambda: audit.clopper_pearson(5, 3, 0.05), "successes"),
    (lambda: audit.complementary_splits(10, 3, np.random.default_rng()), "even"),
    (lambda: audit.complementary_splits(10, 2, np.random.default_rng()), ">= 4"),
    (lambda: audit.lira_scores(np.ones(2), np.ones((2, 2)), np.array([[True, False], [False, True]])), "at least 2"),
    (lambda: audit.preset_trainer(lipdp.datasets.load("digits")[2], 1.0, epochs=0), "epochs"),
    (lambda: audit.lira_scores(np.ones(2), np.ones((4, 2)), np.array([[True, True]] * 3 + [[True, False]])), "out of at least 2"),
    (lambda: audit.lira_scores(np.ones(3), np.ones((2, 2)), np.ones((2, 2), bool)), "shape"),
])
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def pool(digits):
    (x, y), _, info = digits
    chosen = np.random.default_rng(0).permutation(len(x))[:POOL]
    return x[chosen], y[chosen], info


def _audit(pool, epsilon, shadow_models=0, epochs=EPOCHS):
    x, y, info = pool
    trainer = audit.preset_trainer(info, epsilon, 1e-5, epochs=epochs, batch_size=32)
    return audit.audit_training(trainer, x, y, shadow_models=shadow_models, seed=0)


@pytest.fixture(scope="module")
def memorised(pool):
    return _audit(pool, None)


def test_loss_attack_beats_chance_on_a_memorising_non_private_model(memorised):
    result = memorised.audits["loss"]
    assert result.members + result.non_members == POOL and result.members == memorised.members.sum()
    assert result.accounted_epsilon is None
    assert result.auc > 0.6 and result.auc_interval[0] > 0.5
    # so a model trained without noise would break the epsilon = 1 checks below
    assert result.auc > audit.dp_auc_bound(1.0, 1e-5) + 0.05


def test_private_model_at_epsilon_one_stays_within_the_bound(pool, memorised):
    run = _audit(pool, 1.0)
    result = run.audits["loss"]
    assert np.array_equal(run.members, memorised.members)  # the same members as the memorising model
    assert result.accounted_epsilon <= 1.0
    assert result.epsilon_lower_bound <= result.accounted_epsilon
    assert result.auc_interval[0] <= audit.dp_auc_bound(result.accounted_epsilon, result.delta)
    assert result.auc < memorised.audits["loss"].auc


def test_audit_training_runs_lira_with_shadow_models(pool):
    run = _audit(pool, None, shadow_models=4, epochs=5)
    assert set(run.audits) == {"loss", "lira"}
    assert run.audits["lira"].members == run.members.sum()


@pytest.mark.slow
def test_lira_beats_the_loss_attack_on_a_memorising_model(pool, memorised):
    lira = _audit(pool, None, shadow_models=8).audits["lira"]
    assert lira.auc > 0.6 and lira.auc_interval[0] > 0.5
    assert lira.points[0].tpr > memorised.audits["loss"].points[0].tpr  # at FPR 1 %
