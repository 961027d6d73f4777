"""Per-example gradient bounds of a DP model, and measured per-example gradient norms.

``gradient_bounds(model)`` chains the layers' rules (see :mod:`lipdp.layers`) from the
input radius X_0 = R of ``DPBoundedInput`` and the loss constant G_top = L;
``per_example_gradient_norms`` measures the real thing, one example at a time, for
tests and teaching plots.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import tensorflow as tf

from lipdp.layers import ChainBounds, DPBoundedInput, chain_bounds, check_no_shared_layers
from lipdp.losses import check_dp_loss
from lipdp.quiet import quiet

# Bounds are inflated by this relative slack so that float32 rounding in the forward and
# backward passes (relative errors ~1e-7 per operation) cannot make a measured norm
# exceed them. It is far below anything that changes epsilon or accuracy.
FLOAT32_SLACK = 1e-5


def top_gradient_bound(model, loss=None) -> float:
    """G_top: the bound on one example's ``||dl/dlogits||``: the loss's constant L, or the
    model's loss-gradient clipping threshold C when that is smaller."""
    bound = check_dp_loss(loss or model.loss).lipschitz_constant(int(model.output_shape[-1]))
    clip = getattr(model, "loss_gradient_clip", None)
    return bound if clip is None else min(bound, clip)


def bound_chain(model, loss=None) -> ChainBounds:
    """Input-norm bounds X_k and gradient-norm bounds G_k layer by layer, and the
    parameter-gradient bounds, for one example."""
    layers = model.layers
    if not layers or not isinstance(layers[0], DPBoundedInput):
        raise ValueError(
            "The model has no input bound: make lipdp.layers.DPBoundedInput(radius) its first "
            "layer, so that every example's norm is at most the radius."
        )
    check_no_shared_layers(layers)
    return chain_bounds(layers, math.inf, top_gradient_bound(model, loss))


def gradient_bounds(model, loss=None) -> dict[str, float]:
    """``{variable name: bound on one example's ||dl_i/dtheta||_F}`` for every trainable
    variable (the bound for one example's own loss, not divided by the batch size).
    ``loss`` defaults to the compiled one. The bounds hold for the current weights."""
    bounds = bound_chain(model, loss).parameter_bounds
    names = [variable.name for variable in model.trainable_variables]
    if len(set(names)) != len(names):
        raise ValueError(f"Trainable variable names are not unique: {names}. Give the layers distinct names.")
    missing = [name for name in names if name not in bounds]
    if missing:
        raise ValueError(f"No gradient bound for trainable variables {missing}: their layer has no bound rule for them.")
    return {name: bounds[name] * (1.0 + FLOAT32_SLACK) for name in names}


_VECTORISED = weakref.WeakKeyDictionary()  # model -> (what it was compiled for, function)


def per_example_gradients(model, x, y) -> list[tf.Tensor]:
    """One gradient per example and variable, shape (batch, *variable.shape),
    computed with ``tf.vectorized_map`` (each example's own loss, training mode).
    The vectorised function is compiled once per model, loss and set of trainable
    variables (freezing a layer or recompiling builds a new one)."""
    variables = model.trainable_variables
    key = (id(model.loss), tuple(id(v) for v in variables))
    if _VECTORISED.get(model, (None,))[0] != key:
        # As the train step computes them: DP models may transform the logits' gradient.
        training_logits = getattr(model, "training_logits", lambda x: model(x, training=True))

        def one_example(example):
            xi, yi = example
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model.loss(yi[None], training_logits(xi[None])))
            return tape.gradient(loss, variables)

        _VECTORISED[model] = (key, tf.function(lambda x, y: tf.vectorized_map(one_example, (x, y)), reduce_retracing=True))
    with quiet("tensorflow"):  # pfor warns that conv filter gradients fall back to a loop: harmless
        return _VECTORISED[model][1](tf.convert_to_tensor(x, tf.float32), tf.convert_to_tensor(y))


def per_example_gradient_norms(model, x, y) -> dict[str, np.ndarray]:
    """``{variable name: array of per-example ||dl_i/dtheta||_F}`` (same keys as
    :func:`gradient_bounds`). These are raw norms on the examples given: computed on
    training data they are *not* covered by the privacy guarantee."""
    gradients = per_example_gradients(model, x, y)
    return {
        variable.name: tf.norm(tf.reshape(gradient, (gradient.shape[0], -1)), axis=1).numpy()
        for variable, gradient in zip(model.trainable_variables, gradients)
    }


def noise_to_signal(model, x, y, expected_batch_size: float) -> dict[str, float]:
    """Per variable: the expected norm of the noise on the averaged gradient,
    std * sqrt(d) / (qN), over the norm of the mean gradient on (x, y).
    On training data this is not private; use held-out data to show it."""
    x = tf.convert_to_tensor(x, tf.float32)
    with tf.GradientTape() as tape:
        mean_loss = tf.reduce_mean(model.loss(y, model(x, training=True)))
    gradients = tape.gradient(mean_loss, model.trainable_variables)
    stds = model.noise_stddevs()
    return {
        v.name: stds[v.name] * math.sqrt(int(np.prod(v.shape))) / expected_batch_size / max(float(tf.norm(g)), 1e-12)
        for v, g in zip(model.trainable_variables, gradients)
    }
