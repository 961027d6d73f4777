"""PrivacyBudget: stops before the budget is exceeded, refuses a spent budget, and a
resumed run (weights + ledger restored from a checkpoint) accounts like an
uninterrupted one. Expected epsilons come from dp_accounting directly."""

from __future__ import annotations

import dp_accounting
import pytest

import lipdp
import tensorflow as tf
from lipdp import accounting, datasets, presets
from lipdp.callbacks import PrivacyBudget
from lipdp.model import DPParameters

DELTA = 1e-5
BATCH = 256  # digits: 1438 training examples -> q = 0.178, 6 steps an epoch
RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def direct_pld_epsilon(sigma, q, steps, delta=DELTA):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return dp_accounting.pld.PLDAccountant(RELATION).compose(event).get_epsilon(delta)


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


def make_model(info, sigma):
    model = presets.build_model("dense", info, DPParameters(sigma, DELTA))
    model.compile(
        optimizer=tf.keras.optimizers.Adam(1e-2),
        loss=lipdp.losses.DPTauCategoricalCrossentropy(10.0),
        metrics=["accuracy"],
    )
    return model


def test_budget_stops_training_in_time(digits):
    (x, y), _, info = digits
    sigma, budget, epochs = 1.5, 3.0, 10
    q = BATCH / len(x)
    steps_per_epoch = round(len(x) / BATCH)
    # planned: 60 steps, far beyond the budget at this sigma
    assert direct_pld_epsilon(sigma, q, epochs * steps_per_epoch) > budget

    model = make_model(info, sigma)
    callback = PrivacyBudget(budget, verbose=False)
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, sampling_seed=0, callbacks=[callback], verbose=0)

    steps = model.privacy_ledger.steps
    assert steps == accounting.max_steps(budget, sigma, q, DELTA)
    assert callback.stopped_early
    assert steps < epochs * steps_per_epoch
    # independent: the last step fits, one more would not
    assert direct_pld_epsilon(sigma, q, steps) <= budget
    assert direct_pld_epsilon(sigma, q, steps + 1) > budget
    statement = model.privacy_statement()
    assert statement.epsilon <= budget
    assert statement.epsilon == pytest.approx(direct_pld_epsilon(sigma, q, steps), rel=1e-6)
    assert statement.segments == ((pytest.approx(q, rel=1e-12), sigma, steps),)

    # history: one epsilon per epoch run, nondecreasing, the last one the final epsilon
    eps = history.history["epsilon"]
    assert len(eps) == len(history.epoch) == -(-steps // steps_per_epoch)
    assert all(a <= b for a, b in zip(eps, eps[1:]))
    for epoch, value in enumerate(eps[:-1]):  # whole epochs
        assert value == pytest.approx(direct_pld_epsilon(sigma, q, (epoch + 1) * steps_per_epoch), rel=1e-6)
    assert eps[-1] == pytest.approx(statement.epsilon, rel=1e-9)

    # The spent budget refuses any further step.
    with pytest.raises(accounting.BudgetExhaustedError, match="epsilon"):
        model.fit(x, y, batch_size=BATCH, epochs=1, sampling_seed=1, callbacks=[PrivacyBudget(budget)], verbose=0)
    assert model.privacy_ledger.steps == steps


def test_budget_does_not_stop_a_run_that_fits(digits):
    (x, y), _, info = digits
    sigma, epochs = 3.0, 2
    q = BATCH / len(x)
    model = make_model(info, sigma)
    callback = PrivacyBudget(3.0, verbose=False)
    history = model.fit(x, y, batch_size=BATCH, epochs=epochs, sampling_seed=0, callbacks=[callback], verbose=0)
    steps = epochs * round(len(x) / BATCH)
    assert model.privacy_ledger.steps == steps
    assert not callback.stopped_early
    assert len(history.history["epsilon"]) == epochs
    assert history.history["epsilon"][-1] == pytest.approx(direct_pld_epsilon(sigma, q, steps), rel=1e-6)


def test_budget_too_small_for_one_step_raises_at_start(digits):
    (x, y), _, info = digits
    sigma = 0.5
    q = BATCH / len(x)
    one_step = direct_pld_epsilon(sigma, q, 1)
    model = make_model(info, sigma)
    with pytest.raises(accounting.BudgetExhaustedError):
        model.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[PrivacyBudget(one_step * 0.9)], verbose=0)
    assert model.privacy_ledger.steps == 0
    assert model.optimizer.iterations.numpy() == 0  # no step was taken


def test_budget_needs_a_private_model(digits):
    (x, y), _, info = digits
    model = presets.build_model("dense", info, None)
    model.compile(optimizer=tf.keras.optimizers.Adam(1e-2), loss=lipdp.losses.DPTauCategoricalCrossentropy(10.0))
    with pytest.raises(TypeError, match="private"):
        model.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[PrivacyBudget(3.0)], verbose=0)


@pytest.mark.parametrize("epsilon", [0.0, -1.0, float("nan")])
def test_budget_rejects_bad_epsilon(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        PrivacyBudget(epsilon)


def test_budget_accounts_earlier_segments_with_other_parameters(digits):
    """A second fit at another batch size (another q) spends what is left after the first."""
    (x, y), _, info = digits
    sigma, budget = 2.0, 2.5
    q1, q2 = BATCH / len(x), 512 / len(x)
    model = make_model(info, sigma)
    model.fit(x, y, batch_size=BATCH, epochs=1, sampling_seed=0, verbose=0)
    first = model.privacy_ledger.steps
    callback = PrivacyBudget(budget, accountant="rdp", verbose=False)
    model.fit(x, y, batch_size=512, epochs=30, sampling_seed=1, callbacks=[callback], verbose=0)
    assert callback.stopped_early
    second = model.privacy_ledger.steps - first
    assert model.privacy_ledger.segments == (
        (pytest.approx(q1, rel=1e-12), sigma, first),
        (pytest.approx(q2, rel=1e-12), sigma, second),
    )

    def direct(steps2):
        events = [
            dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), t)
            for q, t in ((q1, first), (q2, steps2))
        ]
        accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=RELATION)
        return accountant.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(DELTA)

    assert direct(second) <= budget < direct(second + 1)
    assert model.privacy_statement("rdp").epsilon == pytest.approx(direct(second), rel=1e-6)


# --------------------------------------------------------------------- resumption
def _restore_fresh(info, sigma, path):
    model = make_model(info, sigma)
    model.load_weights(path)
    return model


def test_resumed_run_accounts_like_uninterrupted(digits, tmp_path):
    (x, y), _, info = digits
    sigma = 2.0
    q = BATCH / len(x)
    steps_per_epoch = round(len(x) / BATCH)

    straight = make_model(info, sigma)
    straight.fit(x, y, batch_size=BATCH, epochs=4, sampling_seed=0, verbose=0)

    first = make_model(info, sigma)
    first.fit(x, y, batch_size=BATCH, epochs=2, sampling_seed=0, verbose=0)
    path = str(tmp_path / "checkpoint" / "weights")  # TensorFlow format (no .h5)
    first.save_weights(path)

    resumed = _restore_fresh(info, sigma, path)
    assert resumed.privacy_ledger.steps == 2 * steps_per_epoch  # the ledger came back
    history = resumed.fit(x, y, batch_size=BATCH, epochs=4, initial_epoch=2, sampling_seed=1, verbose=0)
    assert history.epoch == [2, 3]

    assert resumed.privacy_ledger.steps == straight.privacy_ledger.steps == 4 * steps_per_epoch
    assert resumed.privacy_ledger.segments == straight.privacy_ledger.segments
    expected = direct_pld_epsilon(sigma, q, 4 * steps_per_epoch)
    assert straight.privacy_statement().epsilon == pytest.approx(expected, rel=1e-6)
    assert resumed.privacy_statement().epsilon == pytest.approx(straight.privacy_statement().epsilon, rel=1e-12)


def test_resumed_run_stops_where_the_uninterrupted_one_does(digits, tmp_path):
    (x, y), _, info = digits
    # RDP here: it is fast, and the point is that the resumed run stops at the same step.
    sigma, budget = 1.5, 3.0
    assert accounting.max_steps(budget, sigma, BATCH / len(x), DELTA, accountant="rdp") % round(len(x) / BATCH) != 0

    straight = make_model(info, sigma)
    straight.fit(x, y, batch_size=BATCH, epochs=10, callbacks=[PrivacyBudget(budget, accountant="rdp", verbose=False)], verbose=0)

    first = make_model(info, sigma)
    first.fit(x, y, batch_size=BATCH, epochs=2, callbacks=[PrivacyBudget(budget, accountant="rdp", verbose=False)], verbose=0)
    checkpoint = tf.train.Checkpoint(model=first)
    path = checkpoint.write(str(tmp_path / "ckpt"))

    resumed = make_model(info, sigma)
    tf.train.Checkpoint(model=resumed).read(path)
    callback = PrivacyBudget(budget, accountant="rdp", verbose=False)
    history = resumed.fit(x, y, batch_size=BATCH, epochs=10, initial_epoch=2, callbacks=[callback], verbose=0)

    assert callback.stopped_early
    assert resumed.privacy_ledger.steps == straight.privacy_ledger.steps
    assert resumed.privacy_statement("rdp").epsilon == pytest.approx(straight.privacy_statement("rdp").epsilon, rel=1e-12)
    assert resumed.privacy_statement("rdp").epsilon <= budget
    assert history.history["epsilon"][-1] == pytest.approx(straight.privacy_statement("rdp").epsilon, rel=1e-12)
    assert resumed.privacy_ledger.steps == accounting.max_steps(budget, sigma, BATCH / len(x), DELTA, accountant="rdp")
