"""Shared helpers: independent per-example gradients (a plain loop, not lipdp's code)."""

import lipdp  # noqa: I001  (first: switches to legacy Keras and quiets TensorFlow's start-up logs)
import numpy as np
import pytest
import tensorflow as tf


def loop_per_example_gradient_norms(model, x, y):
    """{variable name: per-example ||dl_i/dtheta||}, one GradientTape per example."""
    norms = {v.name: [] for v in model.trainable_variables}
    for xi, yi in zip(np.asarray(x, np.float32), np.asarray(y)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model.loss(yi[None], model(xi[None], training=True)))
        for variable, gradient in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables)):
            norms[variable.name].append(float(tf.norm(gradient)))
    return {name: np.array(values) for name, values in norms.items()}


@pytest.fixture(scope="session")
def digits():
    return lipdp.datasets.load("digits")
