"""Step time of clipless vs clipped (per-example, vectorised) DP-SGD vs a plain Keras step.

The same MNIST-size CNN shape (conv 32, conv 64, dense 128, dense 10) in three versions:
the clipless DP model (projected layers, GroupSort, L2-norm pooling), the unconstrained
Keras model under per-example clipping (DPClippedModel), and that Keras model trained
without privacy by Keras' own train step. Medians over repeats after a warm-up, in one
process, so the ratios compare like with like.
Run: python benchmarks/step_time.py [--batch-sizes 256 1024] [--repeats 10] [--json]
"""

import argparse
import json
import statistics
import time

import numpy as np
import tensorflow as tf

import lipdp
from lipdp import layers as L
from lipdp import losses
from lipdp.clipping import DPClippedModel

SHAPE, CLASSES, N = (28, 28, 1), 10, 60000
CE = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def clipless_model():
    model = lipdp.DPSequential([
        L.DPBoundedInput(5.6, input_shape=SHAPE),
        L.DPSpectralConv2D(32, 3), L.DPGroupSort(2), L.DPScaledL2NormPooling2D(2),
        L.DPSpectralConv2D(64, 3), L.DPGroupSort(2), L.DPScaledL2NormPooling2D(2),
        L.DPFlatten(), L.DPSpectralDense(128), L.DPGroupSort(2), L.DPSpectralDense(CLASSES),
    ], dp_parameters=lipdp.DPParameters(1.0, 1e-5))
    model.compile(tf.keras.optimizers.Adam(1e-3), loss=losses.DPTauCategoricalCrossentropy(30.0))
    return model


def keras_model():
    K = tf.keras.layers
    return tf.keras.Sequential([
        K.InputLayer(input_shape=SHAPE), K.Conv2D(32, 3, padding="same", activation="relu"), K.MaxPooling2D(2),
        K.Conv2D(64, 3, padding="same", activation="relu"), K.MaxPooling2D(2), K.Flatten(),
        K.Dense(128, activation="relu"), K.Dense(CLASSES),
    ])


def clipped_model():
    model = DPClippedModel(keras_model(), lipdp.DPParameters(1.0, 1e-5), clip_norm=1.0)
    model.compile(tf.keras.optimizers.Adam(1e-3), loss=CE)
    return model


def nonprivate_model():
    model = keras_model()
    model.compile(tf.keras.optimizers.Adam(1e-3), loss=CE)
    return model


def median_step_seconds(model, batch, repeats: int, private: bool) -> float:
    if private:
        model.prepare_run(len(batch[0]) / N, N)
    step = tf.function(model.train_step)
    step(batch)  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), step(batch))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    for size in args.batch_sizes:
        batch = (tf.constant(rng.random((size, *SHAPE), dtype=np.float32)), tf.constant(rng.integers(0, CLASSES, size)))
        row = {
            "non_private": median_step_seconds(nonprivate_model(), batch, args.repeats, private=False),
            "clipless": median_step_seconds(clipless_model(), batch, args.repeats, private=True),
            "clipped": median_step_seconds(clipped_model(), batch, args.repeats, private=True),
        }
        row["clipless_over_nonprivate"] = row["clipless"] / row["non_private"]
        row["clipped_over_clipless"] = row["clipped"] / row["clipless"]
        results[size] = row
        print(f"batch {size:5d}: non-private {row['non_private'] * 1000:7.1f} ms  clipless {row['clipless'] * 1000:7.1f} ms  "
              f"clipped {row['clipped'] * 1000:7.1f} ms   clipless/non-private {row['clipless_over_nonprivate']:.2f}  "
              f"clipped/clipless {row['clipped_over_clipless']:.2f}", flush=True)
    if args.json:
        print(json.dumps({str(size): row for size, row in results.items()}))
