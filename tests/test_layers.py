"""Projections give a true Lipschitz constant <= 1, measured on the actual operators."""

import numpy as np
import pytest
import tensorflow as tf

import lipdp
from lipdp import layers as L


def operator_norm(apply, input_shape, iterations=300, seed=0):
    """Power iteration on the linear operator itself (A^T A x by autodiff), not on a
    reshaped kernel. It under-estimates, so it is used to catch norms above 1."""
    x = tf.random.stateless_normal((1, *input_shape), seed=(seed, 1))

    @tf.function
    def step(x):
        x = x / tf.norm(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = apply(x)
            energy = 0.5 * tf.reduce_sum(y * y)
        return tape.gradient(energy, x), tf.norm(y)

    for _ in range(iterations):
        x, norm = step(x)
    return float(norm)


CONV_CASES = [
    dict(filters=4, kernel_size=3, strides=1, padding="same"),
    dict(filters=4, kernel_size=3, strides=2, padding="same"),
    dict(filters=6, kernel_size=(3, 5), strides=(1, 2), padding="valid"),
    dict(filters=3, kernel_size=2, strides=2, padding="valid"),
    dict(filters=8, kernel_size=1, strides=1, padding="same"),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c['kernel_size']}-{c['strides']}-{c['padding']}")
@pytest.mark.parametrize("projection", ["bjorck", "rescale"])
def test_conv_operator_norm_is_at_most_one_after_projection(case, projection):
    layer = L.DPSpectralConv2D(**case, projection=projection)
    shape = (10, 10, 2)
    layer.build((None, *shape))
    rng = np.random.default_rng(0)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32) * 3)
    assert operator_norm(layer, shape) > 1.05  # the measurement sees an unprojected kernel
    layer.project()
    assert operator_norm(layer, shape) <= 1.0 + 1e-5


def test_conv_projection_is_not_the_rko_heuristic():
    """An orthogonal reshaped kernel without the sqrt(n) factor has operator norm > 1
    (deel-lip's RKO correction is a heuristic): the projection must include the factor."""
    layer = L.DPSpectralConv2D(1, 3)
    layer.build((None, 12, 12, 1))
    layer.kernel.assign(tf.fill(layer.kernel.shape, 1.0 / 3.0))  # reshaped norm 1
    assert operator_norm(layer, (12, 12, 1)) > 2.0
    layer.project()
    assert operator_norm(layer, (12, 12, 1)) <= 1.0 + 1e-5


@pytest.mark.parametrize("projection", ["bjorck", "rescale"])
def test_dense_spectral_norm_is_at_most_one(projection):
    layer = L.DPSpectralDense(7, projection=projection)
    layer.build((None, 13))
    layer.kernel.assign(np.random.default_rng(1).normal(size=(13, 7)).astype(np.float32) * 5)
    layer.project()
    assert np.linalg.svd(layer.kernel.numpy().astype(np.float64), compute_uv=False).max() <= 1.0
    if projection == "bjorck":  # orthogonal: all singular values close to 1
        assert np.linalg.svd(layer.kernel.numpy(), compute_uv=False).min() > 0.99


def test_layers_are_projected_from_construction():
    layer = L.DPSpectralDense(5, kernel_initializer=tf.keras.initializers.RandomNormal(stddev=10.0))
    layer.build((None, 20))
    assert np.linalg.svd(layer.kernel.numpy().astype(np.float64), compute_uv=False).max() <= 1.0


def test_exact_spectral_norm_matches_numpy():
    matrix = np.random.default_rng(2).normal(size=(30, 11)).astype(np.float32)
    expected = np.linalg.svd(matrix.astype(np.float64), compute_uv=False).max()
    assert abs(float(L.exact_spectral_norm(matrix)) - expected) < 1e-9 * expected
    assert abs(float(L.exact_spectral_norm(matrix.T)) - expected) < 1e-9 * expected


def test_bias_projection_bounds_its_norm():
    layer = L.DPAddBias(0.7)
    layer.build((None, 4, 4, 6))
    layer.bias.assign(np.full(6, 5.0, np.float32))
    layer.project()
    assert np.linalg.norm(layer.bias.numpy().astype(np.float64)) <= 0.7


def _lipschitz_ratio(layer, shape, seed=0, pairs=64):
    """max ||f(a) - f(b)|| / ||a - b|| over random pairs, some of them very close."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(pairs, *shape)).astype(np.float32)
    b = a + rng.normal(size=a.shape).astype(np.float32) * rng.choice([1.0, 1e-2], size=(pairs,) + (1,) * len(shape))
    fa, fb = layer(a).numpy().reshape(pairs, -1), layer(b).numpy().reshape(pairs, -1)
    return np.max(np.linalg.norm(fa - fb, axis=1) / np.linalg.norm((a - b).reshape(pairs, -1), axis=1))


@pytest.mark.parametrize("make", [
    lambda: L.DPGroupSort(2), lambda: L.DPGroupSort(4), lambda: L.DPScaledL2NormPooling2D(2),
    lambda: L.DPGlobalL2NormPooling2D(), lambda: L.DPBoundedInput(1.0),
    lambda: L.DPResidual([L.DPSpectralConv2D(4, 3), L.DPGroupSort(2), L.DPAddBias(1.0)]),
], ids=["groupsort2", "groupsort4", "l2pool", "global_l2pool", "bounded_input", "residual"])
def test_nonlinear_layers_are_1_lipschitz(make):
    assert _lipschitz_ratio(make(), (6, 6, 4)) <= 1.0 + 1e-5


def test_residual_branch_must_keep_the_shape():
    block = L.DPResidual([L.DPSpectralConv2D(8, 3)])
    with pytest.raises(ValueError, match="keep the shape"):
        block.build((None, 6, 6, 4))


@pytest.mark.parametrize("make, message", [
    (lambda: L.DPSpectralDense(4, use_bias=True), "DPAddBias"),
    (lambda: L.DPSpectralConv2D(4, 3, use_bias=True), "DPAddBias"),
    (lambda: L.DPSpectralConv2D(4, 3, dilation_rate=2), "dilation"),
    (lambda: L.DPSpectralDense(4, projection="power_iteration"), "projection"),
    (lambda: L.DPScaledL2NormPooling2D(3, strides=1), "overlapping"),
    (lambda: L.DPBoundedInput(0.0), "radius"),
    (lambda: L.DPBoundedInput(float("nan")), "radius"),
    (lambda: L.DPAddBias(-1.0), "norm_max"),
    (lambda: L.DPResidual([]), "at least one"),
    (lambda: L.DPResidual([tf.keras.layers.Dense(3)]), "no per-example gradient bound"),
    (lambda: L.DPSpectralDense(4, activation="sigmoid"), "activation"),
    (lambda: L.DPSpectralConv2D(4, 3, activation="selu"), "activation"),
    (lambda: L.DPGroupSort(2, k_coef_lip=10.0), "k_coef_lip"),
    (lambda: L.DPScaledL2NormPooling2D(2, k_coef_lip=2.0), "k_coef_lip"),
    (lambda: L.DPGlobalL2NormPooling2D(k_coef_lip=2.0), "k_coef_lip"),
])
def test_bad_layer_arguments_are_refused(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_layer_configs_round_trip():
    model = lipdp.DPSequential([
        L.DPBoundedInput(2.0, input_shape=(6, 6, 2)), L.DPSpectralConv2D(4, 3, projection="rescale"), L.DPAddBias(0.5),
        L.DPGroupSort(2), L.DPResidual([L.DPSpectralConv2D(4, 3), L.DPGroupSort(2)]), L.DPScaledL2NormPooling2D(2),
        L.DPReshape((9, 4)), L.DPFlatten(), L.DPSpectralDense(3),
    ])
    config = model.get_config()
    clone = lipdp.DPSequential.from_config(config, custom_objects=L.CUSTOM_OBJECTS)
    assert [type(layer) for layer in clone.layers] == [type(layer) for layer in model.layers]
    assert clone.layers[1].projection == "rescale"
    assert clone.layers[3].n == 2


def test_groupsort_backward_is_a_permutation_at_ties():
    """At ties, deel-lip's min/max GroupSort sends both output gradients to one input
    (up to sqrt(2) times the gradient norm); DPGroupSort's backward pass is a permutation.
    deel-lip pairs channels (2c, 2c + 1), DPGroupSort pairs (c, c + C/2): the same map up
    to the channel permutation ``interleave``."""
    from deel.lip.layers import GroupSort

    x = tf.constant([[1.0, 0.0, -2.0, 1.0, 0.0, -2.0]])  # every pair (c, c + 3) is a tie
    upstream = tf.constant([[1.0, 3.0, 0.5, 1.0, 3.0, 0.5]])  # min/max: (g1, g2) -> (g1 + g2, 0) at a tie
    interleave = [0, 3, 1, 4, 2, 5]

    def input_gradient(layer, x, upstream):
        layer.build(x.shape)
        with tf.GradientTape() as tape:
            tape.watch(x)
            inner = tf.reduce_sum(layer(x) * upstream)
        return tape.gradient(inner, x)

    ours = input_gradient(L.DPGroupSort(2), x, upstream)
    np.testing.assert_allclose(np.sort(ours.numpy().ravel()), np.sort(upstream.numpy().ravel()))
    x_adjacent, upstream_adjacent = tf.gather(x, interleave, axis=1), tf.gather(upstream, interleave, axis=1)
    assert float(tf.norm(input_gradient(GroupSort(n=2), x_adjacent, upstream_adjacent))) > 1.2 * float(tf.norm(upstream))
    np.testing.assert_array_equal(tf.gather(L.DPGroupSort(2)(x), interleave, axis=1).numpy(), GroupSort(n=2)(x_adjacent).numpy())


def test_larger_groups_route_tied_gradients_as_a_permutation():
    x = tf.constant([[2.0, 2.0, 2.0, -1.0]])
    upstream = tf.constant([[1.0, 2.0, 3.0, 4.0]])
    layer = L.DPGroupSort(4)
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        tape.watch(x)
        inner = tf.reduce_sum(layer(x) * upstream)
    gradient = tape.gradient(inner, x).numpy()
    np.testing.assert_allclose(np.sort(gradient.ravel()), [1.0, 2.0, 3.0, 4.0])
