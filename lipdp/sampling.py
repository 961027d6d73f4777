"""Poisson sampling: each example joins a step's batch independently with probability q.

This is the sampling the accountant assumes. It is drawn exactly and cheaply: the batch
size b ~ Binomial(N, q), then a uniform subset of size b (the subset of a Poisson sample,
given its size, is uniform). Batches vary in size and may be empty.

lipdp has no fixed-size shuffled mode for private training: shuffling into batches of
exactly B examples is not what the Poisson accountant analyses, and its honest analysis
gives a larger epsilon. ``DPSequential.fit`` therefore refuses ready-made datasets and
draws its batches here.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import tensorflow as tf

from lipdp.accounting import check_sampling_rate, check_steps


def steps_per_epoch(num_examples: int, expected_batch_size: float) -> int:
    """Steps in one epoch: N / (expected batch size), rounded, at least 1."""
    return max(1, round(num_examples / expected_batch_size))


def poisson_batch_indices(
    num_examples: int, sampling_rate: float, steps: int, seed: int | None = None
) -> Iterator[np.ndarray]:
    """Yield ``steps`` arrays of example indices, one Poisson-sampled batch per step."""
    if not (isinstance(num_examples, (int, np.integer)) and num_examples > 0):
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}.")
    sampling_rate = check_sampling_rate(sampling_rate)
    steps = check_steps(steps)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        size = rng.binomial(num_examples, sampling_rate)
        yield rng.choice(num_examples, size=size, replace=False)


def poisson_dataset(
    x: np.ndarray, y: np.ndarray, sampling_rate: float, steps: int, seed: int | None = None
) -> tf.data.Dataset:
    """A tf.data pipeline of ``steps`` Poisson batches ``(x[idx], y[idx])``.

    The batch dimension is ``None`` in the element spec, so variable and empty batches
    never retrace the train step.
    """
    spec = (
        tf.TensorSpec((None, *x.shape[1:]), tf.as_dtype(x.dtype)),
        tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype)),
    )

    def batches():
        for indices in poisson_batch_indices(len(x), sampling_rate, steps, seed):
            yield x[indices], y[indices]

    return tf.data.Dataset.from_generator(batches, output_signature=spec).prefetch(2)


def expected_batch_size_to_rate(expected_batch_size: float, num_examples: int) -> float:
    """q = expected batch size / N, checked to lie in (0, 1]."""
    if not (expected_batch_size > 0 and math.isfinite(expected_batch_size)):
        raise ValueError(f"batch_size (the expected batch size) must be positive, got {expected_batch_size!r}.")
    return check_sampling_rate(expected_batch_size / num_examples)
