"""Step time and peak memory of one training step: non-private vs clipless vs clipped.

All three train *the same* MNIST-size Lipschitz CNN (conv 32, conv 64, dense 128,
dense 10 with GroupSort and L2-norm pooling; 421K parameters) on the same loss:

* ``non_private``: Keras' own train step (no noise, no projection): the floor;
* ``clipless``: lipdp's DPSequential step (summed gradients, noise, projection);
* ``clipped``: DPClippedModel's DP-SGD step (vectorised per-example gradients,
  clipped to C, noise).

``relu_reference`` is a conventional CNN of the same shape (ReLU, max pooling, biases)
under Keras' step: what the Lipschitz layers themselves cost. Step times are medians
over repeats after a warm-up, the modes interleaved within one process, so the
ratios compare like with like. Peak memory is measured in a fresh process per (mode,
batch size): the growth of the resident set over a model that is built but not yet
stepped.

Run: python benchmarks/step_time.py [--batch-sizes 64 256 1024] [--repeats 10] [--memory] [--profile] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
import tensorflow as tf

import lipdp
from lipdp import layers as L
from lipdp import losses
from lipdp.clipping import DPClippedModel

SHAPE, CLASSES, N = (28, 28, 1), 10, 60000
MODES = ("non_private", "clipless", "clipped", "relu_reference")
DP = lipdp.DPParameters(1.0, 1e-5)


def lipschitz_layers() -> list:
    return [
        L.DPBoundedInput(5.6, input_shape=SHAPE),
        L.DPSpectralConv2D(32, 3), L.DPGroupSort(2), L.DPScaledL2NormPooling2D(2),
        L.DPSpectralConv2D(64, 3), L.DPGroupSort(2), L.DPScaledL2NormPooling2D(2),
        L.DPFlatten(), L.DPSpectralDense(128), L.DPGroupSort(2), L.DPSpectralDense(CLASSES),
    ]


def relu_layers() -> list:
    K = tf.keras.layers
    return [
        K.InputLayer(input_shape=SHAPE), K.Conv2D(32, 3, padding="same", activation="relu"), K.MaxPooling2D(2),
        K.Conv2D(64, 3, padding="same", activation="relu"), K.MaxPooling2D(2), K.Flatten(),
        K.Dense(128, activation="relu"), K.Dense(CLASSES),
    ]


def build(mode: str) -> tf.keras.Model:
    """A compiled model of the given mode (tau cross-entropy, Adam)."""
    if mode == "clipless":
        model = lipdp.DPSequential(lipschitz_layers(), dp_parameters=DP)
    elif mode == "clipped":
        model = DPClippedModel(tf.keras.Sequential(lipschitz_layers()), DP, clip_norm=1.0)
    else:
        model = tf.keras.Sequential(relu_layers() if mode == "relu_reference" else lipschitz_layers())
    model.compile(tf.keras.optimizers.Adam(1e-3), loss=losses.DPTauCategoricalCrossentropy(30.0))
    return model


def compiled_step(model: tf.keras.Model, batch_size: int):
    """The model's train step as ``fit`` runs it, traced once."""
    if hasattr(model, "prepare_run"):
        model.prepare_run(batch_size / N, N)
    return tf.function(model.train_step)


def random_batch(batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (tf.constant(rng.random((batch_size, *SHAPE), dtype=np.float32)),
            tf.constant(rng.integers(0, CLASSES, batch_size)))


def run_step(step, batch) -> float:
    start = time.perf_counter()
    for tensor in tf.nest.flatten(step(batch)):
        if tensor is not None:
            tensor.numpy()  # waits for the result
    return time.perf_counter() - start


def interleaved_medians(functions: dict, batch, repeats: int) -> dict[str, float]:
    """Median seconds of each function on the batch, after a warm-up; the functions take
    turns within each repeat so that a slower period of the machine hits them all alike."""
    for function in functions.values():
        run_step(function, batch)  # trace and warm up
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(run_step(function, batch))
    return {name: statistics.median(values) for name, values in times.items()}


def step_times(batch_size: int, modes, repeats: int) -> dict[str, float]:
    """Median seconds per training step of each mode."""
    steps = {mode: compiled_step(build(mode), batch_size) for mode in modes}
    return interleaved_medians(steps, random_batch(batch_size), repeats)


def clipless_profile(batch_size: int, repeats: int) -> dict[str, float]:
    """Where the clipless step's time goes: the whole step, its gradient sum (what a
    non-private step also computes), the noise draw and the projection, each alone."""
    model = build("clipless")
    step = compiled_step(model, batch_size)
    parts = {
        "step": step,
        "summed_gradients": tf.function(lambda batch: model.summed_gradients(*batch)[1]),
        "noise": tf.function(lambda batch: [model._noise_generator.normal(tf.shape(v)) for v in model.trainable_variables]),
        "projection": tf.function(lambda batch: model.project()),
    }
    return interleaved_medians(parts, random_batch(batch_size), repeats)


def memory_status_megabytes(field: str) -> float:
    """A field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in MB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith(field + ":"))


def peak_step_megabytes(mode: str, batch_size: int, steps: int = 3) -> float:
    """Growth of the peak resident set over a built model, across a few steps (the first
    one traces). The kernel's peak counter is reset first (Linux: clear_refs 5), so the
    peak of importing TensorFlow does not hide the step's."""
    batch = random_batch(batch_size)
    step = compiled_step(build(mode), batch_size)
    before = memory_status_megabytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    for _ in range(steps):
        run_step(step, batch)
    return memory_status_megabytes("VmHWM") - before


def peak_megabytes_in_subprocess(mode: str, batch_size: int) -> float | None:
    """peak_step_megabytes in a fresh process; None if it died (out of memory)."""
    code = f"import step_time; print(step_time.peak_step_megabytes({mode!r}, {batch_size}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=__file__.rsplit("/", 1)[0])
    return float(done.stdout.split()[-1]) if done.returncode == 0 else None


def clipped_fits_in_memory(batch_size: int, parameters: int) -> bool:
    """Per-example gradients take B x P floats, and vectorisation about 3 copies more:
    skip the clipped mode where that would not fit in the memory available now."""
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable"))
    return 4 * batch_size * parameters * 4 < 0.8 * available


def measure(batch_sizes, repeats: int, memory: bool) -> dict:
    """{batch size: {mode: seconds, memory_mb: {mode: MB}, ratios}}, printed as it goes."""
    results = {}
    parameters = build("clipped").inner.count_params()
    for size in batch_sizes:
        modes = [mode for mode in MODES if mode != "clipped" or clipped_fits_in_memory(size, parameters)]
        row = step_times(size, modes, repeats)
        row["clipless_over_nonprivate"] = row["clipless"] / row["non_private"]
        row["clipped_over_clipless"] = row["clipped"] / row["clipless"] if "clipped" in row else None
        row["lipschitz_over_relu"] = row["non_private"] / row["relu_reference"]
        if memory:
            row["memory_mb"] = {mode: peak_megabytes_in_subprocess(mode, size) for mode in MODES if mode in modes}
        results[size] = row
        print(format_row(size, row), flush=True)
    return results


def format_row(size: int, row: dict) -> str:
    def ms(mode):
        return f"{row[mode] * 1000:8.1f} ms" if mode in row else "   skipped"

    def ratio(value):
        return f"{value:5.2f}" if value is not None else "    -"

    line = (f"batch {size:5d}: non-private {ms('non_private')}  clipless {ms('clipless')}  clipped {ms('clipped')}"
            f"  relu ref {ms('relu_reference')}  | clipless/non-private {ratio(row['clipless_over_nonprivate'])}"
            f"  clipped/clipless {ratio(row['clipped_over_clipless'])}")
    if "memory_mb" in row:
        line += "  | peak MB " + " ".join(f"{mode} {mb:.0f}" if mb is not None else f"{mode} failed"
                                         for mode, mb in row["memory_mb"].items())
    return line


def format_profile(batch_size: int, parts: dict[str, float]) -> str:
    rest = parts["step"] - parts["summed_gradients"] - parts["noise"] - parts["projection"]
    return (f"clipless step at batch {batch_size}: {parts['step'] * 1000:.1f} ms = summed gradients "
            f"{parts['summed_gradients'] * 1000:.1f} + noise {parts['noise'] * 1000:.1f} + projection "
            f"{parts['projection'] * 1000:.1f} + optimizer and the rest {rest * 1000:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--memory", action="store_true", help="also peak memory (a fresh process per mode and size)")
    parser.add_argument("--profile", action="store_true", help="also time the clipless step's parts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = {str(size): row for size, row in measure(args.batch_sizes, args.repeats, args.memory).items()}
    if args.profile:
        results["clipless_profile"] = {}
        for size in args.batch_sizes:
            results["clipless_profile"][str(size)] = clipless_profile(size, args.repeats)
            print(format_profile(size, results["clipless_profile"][str(size)]), flush=True)
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
