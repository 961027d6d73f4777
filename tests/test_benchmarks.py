"""The benchmark scripts measure what they claim: same network in every mode, accounting
numbers that an independent dp_accounting computation reproduces, tuning that never
reads the test split. (Their timings are printed by the scripts, never asserted here.)"""

import json
import pathlib
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accounting_latency  # noqa: E402
import accuracy  # noqa: E402
import figures  # noqa: E402
import step_time  # noqa: E402


def test_the_compared_modes_train_the_same_network():
    models = {mode: step_time.build(mode) for mode in ("non_private", "clipless", "clipped")}
    layer_types = {mode: [type(layer).__name__ for layer in getattr(model, "inner", model).layers]
                   for mode, model in models.items()}
    assert layer_types["non_private"] == layer_types["clipless"] == layer_types["clipped"]
    counts = {mode: getattr(model, "inner", model).count_params() for mode, model in models.items()}
    assert counts["non_private"] == counts["clipless"] == counts["clipped"] == 421_408


def test_step_times_cover_every_mode():
    times = step_time.step_times(8, step_time.MODES, repeats=1)
    assert set(times) == set(step_time.MODES) and all(seconds > 0 for seconds in times.values())


def test_accounting_latency_reports_epsilons_that_dp_accounting_reproduces():
    row = accounting_latency.measure()
    q, steps, delta = row["setting"]["sampling_rate"], row["setting"]["steps"], row["setting"]["delta"]

    def independent_epsilon(sigma):
        event = dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
        return dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)

    assert row["epsilon_pld"] == pytest.approx(independent_epsilon(accounting_latency.SIGMA), rel=1e-6)
    assert row["epsilon_rdp"] > row["epsilon_pld"]  # RDP is the looser accountant
    calibrated = independent_epsilon(row["calibrated_sigma"])
    assert 0.99 * accounting_latency.TARGET_EPSILON < calibrated <= accounting_latency.TARGET_EPSILON


def test_validation_split_is_fixed_and_disjoint():
    x, y = np.arange(600).reshape(600, 1), np.arange(600)
    (fit_x, _), (validation_x, validation_y) = accuracy.validation_split((x, y))
    again = accuracy.validation_split((x, y))[1][0]
    assert len(fit_x) == 500 and len(validation_x) == 100
    assert not set(fit_x.ravel()) & set(validation_x.ravel())
    np.testing.assert_array_equal(validation_x, again)
    np.testing.assert_array_equal(validation_x.ravel(), validation_y)


def test_reported_configs_are_the_best_validation_trials():
    """Each epsilon's config is the best of its validation trials within the time budget:
    the test split played no part in choosing it."""
    saved = json.loads(accuracy.CONFIG.read_text())
    assert set(saved["configs"]) == {"1", "3", "8"}
    for epsilon, spec in saved["configs"].items():
        trials = [t for t in saved["trials"][epsilon] if t["train_seconds"] <= 600]
        best = max(trials, key=lambda t: t["validation_accuracy"])
        assert best["spec"] == spec


def test_figures_are_drawn_from_saved_results(tmp_path):
    row = {"non_private": 0.01, "clipless": 0.011, "clipped": 0.05, "relu_reference": 0.008,
           "memory_mb": {"non_private": 100.0, "clipless": 110.0, "clipped": 900.0, "relu_reference": 90.0}}
    results = {"speed": {"256": row, "1024": row},
               "accuracy": {"dataset": "fashion_mnist.npz", "runs": {
                   "1": {"epsilon": 1.0, "accuracy": 0.8}, "3": {"epsilon": 3.0, "accuracy": 0.82},
                   "non_private": {"epsilon": float("inf"), "accuracy": 0.88}}}}
    written = figures.save_figures(results, tmp_path)
    assert [path.name for path in written] == ["speed_vs_batch.png", "accuracy_vs_epsilon.png"]
    assert all(path.stat().st_size > 10_000 for path in written)


@pytest.mark.slow
def test_quick_benchmark_ends_with_the_step_time_ratios():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--json"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["clipless_over_nonprivate"] > 0 and last["clipped_over_clipless"] > 0
