"""Matplotlib figures for teaching: each function returns a Figure.

Anything computed on private training data is labelled "not private" on the figure.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from lipdp.audit import MembershipAudit, dp_tpr_bound
from lipdp.bounds import bound_chain
from lipdp.certify import certified_accuracy as certified_fraction

NOT_PRIVATE = "training batches (not private)"
AUDIT_NOT_PRIVATE = "computed on the training data: the audit itself is not private"


def _figure(width: float = 5.5, height: float = 3.5, columns: int = 1) -> tuple[Figure, list]:
    figure = Figure(figsize=(width * columns, height), constrained_layout=True)
    return figure, [figure.add_subplot(1, columns, k + 1) for k in range(columns)]


def _short(name: str) -> str:
    """'dp_spectral_dense_1/kernel:0' -> 'dp_spectral_dense_1/kernel'."""
    return name.split(":")[0]


def privacy_budget(curve: tuple, budget: float | None = None, steps_taken: int | None = None) -> Figure:
    """epsilon spent against steps (``curve`` from :func:`lipdp.accounting.epsilon_curve`),
    with the budget line and the steps taken so far."""
    steps, epsilons = curve
    figure, (axes,) = _figure()
    axes.plot(steps, epsilons, marker=".", label="ε after that many steps")
    if budget is not None:
        axes.axhline(budget, color="crimson", linestyle="--", label=f"budget ε = {budget:.3g}")
    if steps_taken:
        axes.axvline(steps_taken, color="grey", linestyle=":", label=f"{steps_taken} steps taken")
    axes.set(xlabel="steps", ylabel="ε spent", title="Privacy budget (PLD accountant)")
    axes.legend(fontsize="small")
    return figure


def accuracy(history: dict) -> Figure:
    """Accuracy per epoch: held-out accuracy solid, training-batch accuracy dashed and
    labelled not private. ``history`` is Keras' ``history.history``."""
    figure, (axes,) = _figure()
    for key, label, style in (("val_accuracy", "held-out data", "-"), ("test_accuracy", "test data", "-"),
                              ("accuracy", NOT_PRIVATE, "--")):
        if history.get(key):
            epochs = np.arange(1, len(history[key]) + 1)
            axes.plot(epochs, history[key], style, marker="o", label=label)
    axes.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="Accuracy")
    axes.legend(fontsize="small")
    return figure


def gradient_norms(norms: dict[str, np.ndarray], bounds: dict[str, float], on_training_data: bool = False) -> Figure:
    """Per-example gradient norms of each variable (histogram) against its analytic bound."""
    names = list(bounds)
    figure, axes_list = _figure(width=3.2, height=2.8, columns=len(names))
    for axes, name in zip(axes_list, names):
        axes.hist(norms[name], bins=20, color="steelblue")
        axes.axvline(bounds[name], color="crimson", linestyle="--", label="bound")
        axes.set(title=_short(name), xlabel="‖∂ℓ/∂θ‖ per example", xlim=(0, 1.05 * bounds[name]))
        axes.title.set_fontsize("small")
    axes_list[0].legend(fontsize="small")
    source = "training data: not private" if on_training_data else "held-out data"
    figure.suptitle(f"Per-example gradient norms vs bounds ({source})", fontsize="medium")
    return figure


def noise_to_signal(ratios: dict[str, float]) -> Figure:
    """Bars of :func:`lipdp.bounds.noise_to_signal` (noise norm / mean-gradient norm)."""
    names = list(ratios)
    figure, (axes,) = _figure(width=max(5.5, 1.2 * len(names)))
    axes.bar(range(len(names)), [ratios[n] for n in names], color="darkorange")
    axes.axhline(1.0, color="grey", linestyle=":")
    axes.set_xticks(range(len(names)), [_short(n) for n in names], rotation=30, ha="right", fontsize="small")
    axes.set(ylabel="noise norm / signal norm", yscale="log", title="Noise-to-signal ratio per variable")
    return figure


def privacy_utility(results: list[dict]) -> Figure:
    """Test accuracy against epsilon over several runs (dicts with 'epsilon', 'test_accuracy')."""
    figure, (axes,) = _figure()
    ordered = sorted(results, key=lambda r: r["epsilon"])
    axes.plot([r["epsilon"] for r in ordered], [r["test_accuracy"] for r in ordered], marker="o")
    axes.set(xlabel="ε", ylabel="test accuracy", ylim=(0, 1), title="Privacy–utility trade-off")
    return figure


def bound_propagation(model) -> Figure:
    """The input-norm bound X_k and the output-gradient bound G_k of every layer."""
    chain = bound_chain(model)
    names = [layer.name for layer in model.layers]
    figure, (left, right) = _figure(width=4.5, columns=2)
    left.bar(range(len(names)), chain.input_bounds[1:] + [chain.output_bound], color="seagreen")
    left.set(title="bound on ‖output‖ per layer (X)", yscale="log")
    right.bar(range(len(names)), chain.output_gradient_bounds, color="slateblue")
    right.set(title="bound on ‖∂ℓ/∂output‖ per layer (G)")
    for axes in (left, right):
        axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="x-small")
    return figure


def mode_comparison(results: dict[str, dict]) -> Figure:
    """Test accuracy and training time per mode ({mode: {'test_accuracy', 'seconds'}})."""
    modes = list(results)
    figure, (left, right) = _figure(width=4.0, columns=2)
    left.bar(modes, [results[m]["test_accuracy"] for m in modes], color="steelblue")
    left.set(ylabel="test accuracy", ylim=(0, 1), title="Accuracy (held-out test set)")
    right.bar(modes, [results[m]["seconds"] for m in modes], color="darkorange")
    right.set(ylabel="seconds", title="Training time")
    return figure


def membership_roc(audits: dict[str, MembershipAudit]) -> Figure:
    """Each attack's ROC (log-log: low FPR is what matters) beside its model's DP bound
    TPR <= min(e^eps FPR + delta, 1 - e^-eps (1 - FPR - delta)) (dashed, same colour; none
    for a non-private model), and chance (TPR = FPR). A grey band marks FPRs counted from
    fewer than 10 non-members; points with FPR = 0 are off the axes."""
    _check_not_empty("membership_roc", audits, "{label: lipdp.audit.MembershipAudit}")
    figure, (axes,) = _figure(height=4.0)
    smallest = min(1.0 / audit.non_members for audit in audits.values())
    grid = np.geomspace(smallest, 1.0, 200)
    axes.plot(grid, grid, color="grey", linestyle=":", label="chance")
    axes.axvspan(smallest, min(1.0, 10 * smallest), color="grey", alpha=0.15,
                 label="FPR from < 10 non-members: counting noise")
    for label, audit in audits.items():
        (line,) = axes.plot(audit.fpr, audit.tpr, label=f"{label}: {audit.attack} attack, AUC {audit.auc:.3f}")
        if audit.accounted_epsilon is not None:
            axes.plot(grid, dp_tpr_bound(grid, audit.accounted_epsilon, audit.delta), linestyle="--",
                      color=line.get_color(), label=f"DP bound, ε = {audit.accounted_epsilon:.3g}, δ = {audit.delta:.0e}")
    axes.set(xscale="log", yscale="log", xlim=(smallest, 1), ylim=(smallest, 1.05), xlabel="false-positive rate",
             ylabel="true-positive rate", title="Membership inference vs the DP bound")
    axes.legend(fontsize="x-small", loc="lower right")
    figure.suptitle(AUDIT_NOT_PRIVATE, fontsize="small")
    return figure


def certified_accuracy(radii: dict[str, np.ndarray], max_radius: float | None = None) -> Figure:
    """Certified accuracy against the L2 radius, one line per model, from held-out
    examples' certified radii (:func:`lipdp.certify.certified_radii`)."""
    _check_not_empty("certified_accuracy", radii, "{label: certified radii}")
    largest = max_radius or max(float(np.max(r)) for r in radii.values()) or 1.0
    grid = np.linspace(0.0, largest, 101)
    figure, (axes,) = _figure()
    for label, model_radii in radii.items():
        axes.plot(grid, certified_fraction(model_radii, grid), label=label)
    axes.set(xlabel="L2 radius (input units)", ylabel="certified accuracy", ylim=(0, 1),
             title="Certified accuracy (held-out data)")
    axes.legend(fontsize="small")
    return figure


def _check_not_empty(plot: str, curves: dict, expected: str) -> None:
    if not curves:
        raise ValueError(f"{plot} needs at least one curve: pass a dict {expected}.")
