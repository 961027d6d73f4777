"""Plots return figures with the right content and label what is not private."""

import numpy as np
import pytest
import tensorflow as tf
from matplotlib.figure import Figure

import lipdp
from lipdp import plots
from lipdp.presets import build_model, make_loss


@pytest.fixture(scope="module")
def trained(digits):
    (x, y), (x_test, y_test), info = digits
    model = build_model("dense", info, lipdp.DPParameters(2.0, 1e-5))
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=make_loss("tau-cce", info, 20.0), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=256, epochs=2, validation_data=(x_test, y_test), verbose=0)
    return model, history.history, (x_test[:32], y_test[:32])


def _texts(figure: Figure) -> str:
    parts = [t.get_text() for t in figure.texts]
    if figure._suptitle is not None:
        parts.append(figure._suptitle.get_text())
    for axes in figure.axes:
        parts += [axes.get_title(), axes.get_xlabel(), axes.get_ylabel()]
        legend = axes.get_legend()
        if legend:
            parts += [t.get_text() for t in legend.get_texts()]
    return " ".join(parts)


def test_privacy_budget_curve_is_increasing_and_shows_the_budget():
    curve = lipdp.accounting.epsilon_curve(1.0, 0.01, 1000, 1e-5)
    assert np.all(np.diff(curve[1]) > 0) and curve[0][-1] == 1000
    assert curve[1][-1] >= lipdp.compute_epsilon(1.0, 0.01, 1000, 1e-5)  # coarse grid: an upper bound
    figure = plots.privacy_budget(curve, budget=3.0, steps_taken=400)
    assert isinstance(figure, Figure) and "budget" in _texts(figure) and "400 steps" in _texts(figure)


def test_accuracy_labels_training_batches_as_not_private(trained):
    _, history, _ = trained
    text = _texts(plots.accuracy(history))
    assert "not private" in text and "held-out" in text


@pytest.mark.parametrize("on_training_data, label", [(True, "not private"), (False, "held-out")])
def test_gradient_norm_histograms_draw_the_bounds(trained, on_training_data, label):
    model, _, (x, y) = trained
    bounds = lipdp.gradient_bounds(model)
    figure = plots.gradient_norms(lipdp.per_example_gradient_norms(model, x, y), bounds, on_training_data)
    assert len(figure.axes) == len(bounds) and label in _texts(figure)
    for axes, bound in zip(figure.axes, bounds.values()):
        assert any(np.allclose(line.get_xdata(), bound) for line in axes.lines)


def test_noise_to_signal_and_bound_propagation(trained):
    model, _, (x, y) = trained
    ratios = lipdp.bounds.noise_to_signal(model, x, y, expected_batch_size=256)
    assert set(ratios) == {v.name for v in model.trainable_variables} and all(r > 0 for r in ratios.values())
    assert len(plots.noise_to_signal(ratios).axes[0].patches) == len(ratios)
    figure = plots.bound_propagation(model)
    assert len(figure.axes) == 2 and len(figure.axes[0].patches) == len(model.layers)


def test_privacy_utility_curve():
    figure = plots.privacy_utility([{"epsilon": 3, "test_accuracy": 0.8}, {"epsilon": 1, "test_accuracy": 0.6}])
    np.testing.assert_array_equal(figure.axes[0].lines[0].get_xdata(), [1, 3])


def test_mode_comparison_has_one_bar_per_mode():
    figure = plots.mode_comparison({"clipless": {"test_accuracy": 0.9, "seconds": 5.0},
                                    "clipped": {"test_accuracy": 0.92, "seconds": 6.0}})
    assert [len(axes.patches) for axes in figure.axes] == [2, 2]


def test_membership_roc_draws_the_dp_bound_of_private_models_only():
    rng = np.random.default_rng(0)
    members = rng.permutation(400) < 200
    audits = {
        "non-private": lipdp.audit.audit_scores(rng.normal(size=400) + members, members, attack="loss"),
        "private": lipdp.audit.audit_scores(rng.normal(size=400), members, attack="loss", accounted_epsilon=1.0),
    }
    figure = plots.membership_roc(audits)
    axes = figure.axes[0]
    assert len(axes.lines) == 4 and len(axes.patches) == 1  # chance, two ROCs, one DP bound; the noise band
    bound = axes.lines[-1]
    np.testing.assert_allclose(bound.get_ydata(), lipdp.audit.dp_tpr_bound(bound.get_xdata(), 1.0, 1e-5))
    text = _texts(figure)
    assert "not private" in text and "ε = 1" in text and axes.get_xscale() == "log"


@pytest.mark.parametrize("plot", [plots.membership_roc, plots.certified_accuracy])
def test_audit_plots_refuse_an_empty_dict(plot):
    with pytest.raises(ValueError, match="at least one curve"):
        plot({})


def test_certified_accuracy_curve_per_model():
    figure = plots.certified_accuracy({"ε = 1": np.array([0.0, 0.1, 0.2]), "ε = 8": np.array([0.3, 0.4, 0.5])})
    lines = figure.axes[0].lines
    assert len(lines) == 2 and "held-out" in _texts(figure)
    for line in lines:
        assert line.get_ydata()[0] <= 1 and np.all(np.diff(line.get_ydata()) <= 0)
    assert lines[1].get_ydata()[0] == 1.0 and lines[0].get_ydata()[0] == pytest.approx(2 / 3)
