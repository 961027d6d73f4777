"""Test accuracy of clipless DP-SGD at several epsilons, with the run time.

The hyper-parameters come from ``benchmarks/accuracy_config.json``, which
``benchmarks/tune.py`` chose on a validation split of the *training* data: the test
split is used once, here, for the final numbers. The data default to
``../shared/data/fashion_mnist.npz`` (Fashion-MNIST, "this split"); any .npz with uint8
``x_train, y_train, x_test, y_test`` works (MNIST, ...), with the same config.

Run: python benchmarks/accuracy.py [--npz PATH] [--epsilons 1 3 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import tensorflow as tf

import lipdp
from lipdp import layers as L
from lipdp import losses
from lipdp.datasets import DatasetInfo, load_npz
from lipdp.sampling import expected_batch_size_to_rate, steps_per_epoch

HERE = pathlib.Path(__file__).parent
FASHION = HERE.parent.parent / "shared" / "data" / "fashion_mnist.npz"
CONFIG = HERE / "accuracy_config.json"
DELTA = 1e-5


def load_config(path: pathlib.Path = CONFIG) -> dict:
    """``{str(epsilon): hyper-parameters}`` as tune.py wrote them."""
    return json.loads(path.read_text())["configs"]


def validation_split(train, fraction: float = 1 / 6, seed: int = 0):
    """A fixed random (train, validation) split of the training data, for tuning."""
    x, y = train
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(len(x) * (1 - fraction)))
    return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])


def build_model(spec: dict, info: DatasetInfo, dp_parameters) -> lipdp.DPSequential:
    """Input clipping to the dataset's radius, then dense GroupSort layers of the given
    widths, then the logits; compiled with the tau cross-entropy at scale tau * R, its
    gradient on the logits clipped to ``loss_gradient_clip`` when the spec has one."""
    hidden = [layer for width in spec["hidden"] for layer in (L.DPSpectralDense(width), L.DPGroupSort(2))]
    model = lipdp.DPSequential(
        [L.DPBoundedInput(info.input_radius, input_shape=info.input_shape), L.DPFlatten(), *hidden,
         L.DPSpectralDense(info.num_classes)],
        dp_parameters=dp_parameters, loss_gradient_clip=spec.get("loss_gradient_clip"),
    )
    model.compile(tf.keras.optimizers.Adam(spec["lr"]),
                  loss=losses.DPTauCategoricalCrossentropy(spec["logit_scale"] / info.input_radius),
                  metrics=["accuracy"])
    return model


def train_and_evaluate(spec: dict, train, evaluation, info: DatasetInfo, epsilon: float | None,
                       delta: float = DELTA) -> dict:
    """Calibrate sigma for (epsilon, delta) over the whole run, train, evaluate.
    ``epsilon=None`` trains the same model without noise (the non-private floor)."""
    x, y = train
    steps = spec["epochs"] * steps_per_epoch(len(x), spec["batch_size"])
    rate = expected_batch_size_to_rate(spec["batch_size"], len(x))
    sigma = None if epsilon is None else lipdp.calibrate_noise_multiplier(epsilon, rate, steps, delta)
    model = build_model(spec, info, None if sigma is None else lipdp.DPParameters(sigma, delta))
    start = time.perf_counter()
    model.fit(x, y, batch_size=spec["batch_size"], epochs=spec["epochs"], verbose=0)
    seconds = time.perf_counter() - start
    _, accuracy = model.evaluate(*evaluation, batch_size=2048, verbose=0)
    spent = None if sigma is None else model.privacy_statement().epsilon  # None: no guarantee
    return {"epsilon": spent, "target_epsilon": epsilon, "delta": delta, "noise_multiplier": sigma,
            "steps": steps, "accuracy": float(accuracy), "train_seconds": seconds}


def tuned_spec(configs: dict, epsilon: float) -> dict:
    if format_epsilon(epsilon) not in configs:
        raise ValueError(f"No tuned hyper-parameters for epsilon = {epsilon:g} (have {sorted(configs)}): "
                         f"run python benchmarks/tune.py --epsilons {epsilon:g} first.")
    return configs[format_epsilon(epsilon)]


def run(npz: str, epsilons: list[float], non_private: bool = False) -> dict:
    """Final test accuracies, one row per epsilon (printed as they come)."""
    train, test, info = load_npz(npz)
    configs = load_config()
    rows = {}
    for epsilon in [*epsilons, *([None] if non_private else [])]:
        spec = tuned_spec(configs, epsilon or 3.0)
        row = train_and_evaluate(spec, train, test, info, epsilon)
        rows[format_epsilon(epsilon) if epsilon else "non_private"] = row
        print(f"{info.name}  eps {row['epsilon'] or float('inf'):6.3f}  test accuracy {row['accuracy']:.4f}  "
              f"({row['train_seconds']:.0f} s of training, sigma {row['noise_multiplier'] or 0:.3f}, "
              f"{row['steps']} steps)", flush=True)
    return {"dataset": info.name, "delta": DELTA, "runs": rows}


def format_epsilon(epsilon: float) -> str:
    return f"{epsilon:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--npz", default=str(FASHION), help="dataset .npz (default: Fashion-MNIST)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--non-private", action="store_true", help="also train the epsilon = 3 config without noise")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.npz, args.epsilons, args.non_private)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
