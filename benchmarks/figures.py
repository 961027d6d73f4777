"""The README's benchmark figures, drawn from the results that benchmarks/run.py saves.

Run: python benchmarks/figures.py [benchmarks/results/results.json]
"""

from __future__ import annotations

import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MODE_STYLES = {
    "non_private": ("non-private (same Lipschitz CNN)", "tab:gray"),
    "clipless": ("clipless DP-SGD (lipdp)", "tab:blue"),
    "clipped": ("DP-SGD, per-example clipping", "tab:red"),
    "relu_reference": ("non-private ReLU CNN (reference)", "tab:olive"),
}
# Published Fashion-MNIST anchors at delta = 1e-5: epsilon, test accuracy %, marker, colour.
ANCHORS = {
    "Tramèr & Boneh 2021, DP CNN": (3.0, 86.0, "*", "tab:red"),
    "Papernot et al. 2021, tempered sigmoids": (2.7, 86.1, "D", "tab:orange"),
}


def speed_figure(speed: dict):
    """Step time and peak step memory against the batch size, one line per mode."""
    sizes = sorted(int(size) for size in speed)
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, (label, color) in MODE_STYLES.items():
        timed = [size for size in sizes if mode in speed[str(size)]]
        time_axis.plot(timed, [1000 * speed[str(size)][mode] for size in timed], "o-", label=label, color=color)
        measured = [size for size in sizes if (speed[str(size)].get("memory_mb") or {}).get(mode) is not None]
        if measured:
            memory_axis.plot(measured, [speed[str(size)]["memory_mb"][mode] for size in measured], "o-", label=label, color=color)
    for axis, title, unit in ((time_axis, "Time per training step", "ms"), (memory_axis, "Peak memory of a step", "MB")):
        axis.set(xscale="log", yscale="log", xlabel="batch size", ylabel=unit, title=title)
        axis.set_xticks(sizes, [str(size) for size in sizes])
        axis.grid(alpha=0.3)
    time_axis.legend(fontsize=8)
    figure.suptitle("MNIST-size CNN (421K parameters), 2 CPU cores")
    figure.tight_layout()
    return figure


def accuracy_figure(accuracy: dict):
    """Test accuracy against epsilon, with the non-private floor and published anchors."""
    runs = accuracy["runs"]
    private = sorted((row["epsilon"], 100 * row["accuracy"]) for key, row in runs.items() if key != "non_private")
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(*zip(*private), "o-", color="tab:blue", label="lipdp clipless (test split)")
    if "non_private" in runs:
        axis.axhline(100 * runs["non_private"]["accuracy"], color="tab:gray", ls="--", label="same model, no noise")
    for label, (epsilon, value, marker, color) in ANCHORS.items():
        axis.plot(epsilon, value, marker, ms=10, ls="none", color=color, label=label)
    axis.set(xlabel="epsilon (delta = 1e-5)", ylabel="test accuracy (%)",
             title=f"{accuracy['dataset'].removesuffix('.npz')}: accuracy against the privacy budget")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_figures(results: dict, folder: pathlib.Path = RESULTS) -> list[pathlib.Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw, key in (("speed_vs_batch.png", speed_figure, "speed"), ("accuracy_vs_epsilon.png", accuracy_figure, "accuracy")):
        if results.get(key) and (key != "accuracy" or "runs" in results[key]):
            figure = draw(results[key])
            figure.savefig(folder / name, dpi=110)
            plt.close(figure)
            written.append(folder / name)
    return written


if __name__ == "__main__":
    path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "results.json"
    for written in save_figures(json.loads(path.read_text()), path.parent):
        print(f"wrote {written}")
