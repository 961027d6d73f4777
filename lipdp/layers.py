"""DP layers: Lipschitz layers that know their per-example gradient bounds.

Notation (one example, DESIGN §3): ``X`` bounds the norm of a layer's input, ``G``
bounds the norm of the loss gradient with respect to the layer's output. Each DP layer
keeps four rules next to its forward pass:

* ``output_bound(X)``                  bound on ``||output||``;
* ``input_gradient_bound(G)``          bound on ``||dl/d input||`` (``Lip * G``);
* ``parameter_gradient_bounds(X, G)``  ``{variable name: bound on ||dl/d theta||_F}``;
* ``project()``                        restore ``Lip <= 1`` after an update.

The forward pass always uses the trainable kernel *as it is*: the bound speaks about the
very matrix the gradient is taken for. The Lipschitz constraint is restored by a
projection after each update (post-processing: it costs no privacy). The constant used
in the bounds is a *proven* one: an exact spectral norm (float64 eigen-decomposition of
the Gram matrix), never power iteration, which under-estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import tensorflow as tf
from deel.lip.layers import GroupSort, ScaledGlobalL2NormPooling2D, ScaledL2NormPooling2D
from deel.lip.normalizers import bjorck_normalization

from lipdp.validation import positive_number

# Projections aim a little below 1 so that float32 rounding of the projected kernel
# (relative error ~6e-8 per entry) cannot push the exact norm above 1.
PROJECTION_TARGET = 1.0 - 1e-5
PROJECTIONS = ("bjorck", "rescale")


class DPLayer:
    """Mixin for layers whose per-example bounds are proven.

    Defaults fit a parameter-free map with ``f(0) = 0`` and Lipschitz constant 1:
    ``||f(x)|| = ||f(x) - f(0)|| <= ||x||`` and ``||J^T g|| <= ||g||``.
    """

    lipschitz_bound = 1.0

    def output_bound(self, input_bound: float) -> float:
        return self.lipschitz_bound * input_bound

    def input_gradient_bound(self, output_gradient_bound: float) -> float:
        return self.lipschitz_bound * output_gradient_bound

    def parameter_gradient_bounds(
        self, input_bound: float, output_gradient_bound: float
    ) -> dict[str, float]:
        return {}

    def project(self) -> None:
        """Restore the layer's constraint; parameter-free layers have none."""
        return None


# --------------------------------------------------------------------------- helpers
def gram_spectral_norm(matrix: tf.Tensor, dtype: tf.DType = tf.float64) -> tf.Tensor:
    """Largest singular value of a 2-D matrix, computed in ``dtype``.

    sigma_max(W)^2 is the largest eigenvalue of the smaller Gram matrix (W^T W or W W^T),
    computed by a symmetric eigen-solver. In float64 it is exact up to float64 rounding
    (float32 entries multiply exactly in float64); in float32 it is an estimate, good to
    about 1e-6, that is never used as a bound.
    """
    w = tf.cast(matrix, dtype)
    gram = tf.matmul(w, w, transpose_a=True) if w.shape[0] >= w.shape[1] else tf.matmul(w, w, transpose_b=True)
    return tf.sqrt(tf.maximum(tf.reduce_max(tf.linalg.eigvalsh(gram)), 0.0))


def exact_spectral_norm(matrix: tf.Tensor) -> tf.Tensor:
    """The proven sigma_max(W), in float64: the only norm the bounds and projections trust."""
    return gram_spectral_norm(matrix, tf.float64)


def project_matrix(matrix: tf.Tensor, method: str, gain: float = 1.0) -> tf.Tensor:
    """Return a matrix M with ``gain * sigma_max(M) <= PROJECTION_TARGET``.

    ``rescale``: M = W * min(1, target / (gain * sigma_max(W))), the smallest change of scale.
    ``bjorck``: deel-lip's Bjorck orthogonalisation of W / sigma_max(W) (all singular
    values close to 1, a gradient-norm-preserving layer), followed by the same exact
    rescaling, so the guarantee never rests on Bjorck's convergence. Bjorck's starting
    scale only needs to be close, so it is computed in float32 (a third of the float64
    cost on the 3136 x 128 kernel of ``benchmarks/``).
    """
    if method == "bjorck":
        norm = tf.cast(gram_spectral_norm(matrix, tf.float32), matrix.dtype)
        matrix = bjorck_normalization(matrix / tf.maximum(norm, 1e-12))
    norm = gain * exact_spectral_norm(matrix)
    scale = tf.minimum(tf.constant(1.0, tf.float64), PROJECTION_TARGET / tf.maximum(norm, 1e-30))
    return tf.cast(tf.cast(matrix, tf.float64) * scale, matrix.dtype)


def current_value(compute) -> float:
    """Evaluate ``compute()`` eagerly, even while a train step is being traced: bounds are
    Python numbers that the step bakes in."""
    with tf.init_scope():
        return float(compute())


def _check_projection(projection: str) -> str:
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}.")
    return projection


def _refuse_unbounded_options(kwargs: dict, layer: str) -> None:
    """Options of the wrapped Keras/deel-lip layer that its bound rules do not cover."""
    if kwargs.pop("use_bias", False):
        raise ValueError(
            f"{layer} has no built-in bias: its bound rules cover the kernel only. "
            "Add a lipdp.layers.DPAddBias(norm_max) after it."
        )
    if kwargs.get("activation") not in (None, "linear"):
        raise ValueError(
            f"{layer} does not take activation={kwargs['activation']!r}: its bounds assume a linear map. "
            "Add a lipdp.layers.DPGroupSort after it."
        )
    if kwargs.pop("k_coef_lip", 1.0) != 1.0:
        raise ValueError(f"{layer} is 1-Lipschitz by construction; k_coef_lip cannot change that.")


# ---------------------------------------------------------------------------- layers
class DPBoundedInput(DPLayer, tf.keras.layers.Layer):
    """Clips each example to ``||x|| <= radius``: the input bound X_0 of the model.

    x -> x * min(1, radius / ||x||), the projection onto a ball: 1-Lipschitz.
    """

    def __init__(self, radius: float, **kwargs):
        super().__init__(**kwargs)
        self.radius = positive_number("DPBoundedInput radius", radius)

    def call(self, inputs):
        # x * (R / max(||x||, R)), not tf.clip_by_norm's (x * R) / max(||x||, R): with huge
        # pixels x * R overflows to inf and inf / inf = NaN; here an overflowing norm gives 0.
        norms = tf.norm(tf.reshape(inputs, (tf.shape(inputs)[0], -1)), axis=1)
        scale = self.radius / tf.maximum(norms, self.radius)
        return inputs * tf.reshape(scale, [-1] + [1] * (inputs.shape.rank - 1))

    def output_bound(self, input_bound: float) -> float:
        return min(input_bound, self.radius)

    def get_config(self):
        return {**super().get_config(), "radius": self.radius}


class DPSpectralDense(DPLayer, tf.keras.layers.Dense):
    """Dense layer ``y = x W`` without bias, kept at ``sigma_max(W) <= 1`` by projection.

    dl/dW = x g^T, so ``||dl/dW||_F = ||x|| ||g|| <= X G``.
    """

    def __init__(self, units: int, projection: str = "bjorck", kernel_initializer="orthogonal", **kwargs):
        _refuse_unbounded_options(kwargs, "DPSpectralDense")
        super().__init__(units, use_bias=False, kernel_initializer=kernel_initializer, **kwargs)
        self.projection = _check_projection(projection)

    def build(self, input_shape):
        super().build(input_shape)
        self.project()  # bounds hold from construction on

    @property
    def lipschitz_bound(self) -> float:
        """1, which the projection guarantees; the exact sigma_max(W) when weights set by
        hand exceed it (fit projects them before any step)."""
        return max(1.0, current_value(lambda: exact_spectral_norm(self.kernel)))

    def parameter_gradient_bounds(self, input_bound, output_gradient_bound):
        return {self.kernel.name: input_bound * output_gradient_bound}

    def project(self) -> None:
        self.kernel.assign(project_matrix(self.kernel, self.projection))

    def get_config(self):
        config = super().get_config()
        config.pop("use_bias", None)
        return {**config, "projection": self.projection}


class DPSpectralConv2D(DPLayer, tf.keras.layers.Conv2D):
    """Conv2D without bias, with a proven Lipschitz bound.

    Let W be the kernel reshaped to (kh*kw*c_in, c_out) and n = ceil(kh/sh) * ceil(kw/sw),
    the most kernel windows any input pixel falls in. Each output pixel is W^T times one
    patch, so ``||conv(x)||^2 <= sigma_max(W)^2 * sum_p ||patch_p||^2 <= n sigma_max(W)^2 ||x||^2``:
    Lip <= sqrt(n) sigma_max(W), and the projection keeps that <= 1.
    dl/dW = sum_p patch_p g_p^T, so by Cauchy-Schwarz ``||dl/dW||_F <= sqrt(n) X G``.
    (Not deel-lip's RKO factor: it scales the kernel, not its gradient.)
    """

    def __init__(
        self,
        filters: int,
        kernel_size,
        strides=1,
        padding: str = "same",
        projection: str = "bjorck",
        kernel_initializer="orthogonal",
        **kwargs,
    ):
        _refuse_unbounded_options(kwargs, "DPSpectralConv2D")
        if kwargs.get("dilation_rate", 1) not in (1, (1, 1)) or kwargs.get("groups", 1) != 1:
            raise ValueError("DPSpectralConv2D supports neither dilation nor groups: its bound assumes dense 1-dilated taps.")
        if kwargs.get("data_format", "channels_last") not in ("channels_last", None):
            raise ValueError("DPSpectralConv2D supports channels_last only.")
        super().__init__(
            filters, kernel_size, strides=strides, padding=padding, use_bias=False,
            kernel_initializer=kernel_initializer, **kwargs,
        )
        self.projection = _check_projection(projection)

    @property
    def overlap(self) -> int:
        """n = ceil(kh/sh) * ceil(kw/sw): kernel windows that can cover one input pixel."""
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        return math.ceil(kh / sh) * math.ceil(kw / sw)

    def build(self, input_shape):
        super().build(input_shape)
        self.project()

    @property
    def lipschitz_bound(self) -> float:
        """1, which the projection guarantees, or sqrt(n) sigma_max(W) if larger."""
        matrix = lambda: tf.reshape(self.kernel, (-1, self.kernel.shape[-1]))  # noqa: E731
        return max(1.0, math.sqrt(self.overlap) * current_value(lambda: exact_spectral_norm(matrix())))

    def parameter_gradient_bounds(self, input_bound, output_gradient_bound):
        return {self.kernel.name: math.sqrt(self.overlap) * input_bound * output_gradient_bound}

    def project(self) -> None:
        shape = self.kernel.shape
        matrix = tf.reshape(self.kernel, (-1, shape[-1]))
        projected = project_matrix(matrix, self.projection, gain=math.sqrt(self.overlap))
        self.kernel.assign(tf.reshape(projected, shape))

    def get_config(self):
        config = super().get_config()
        config.pop("use_bias", None)
        return {**config, "projection": self.projection}


class DPAddBias(DPLayer, tf.keras.layers.Layer):
    """Adds a per-channel bias b, kept at ``||b|| <= norm_max`` by projection.

    On an input with P positions per channel (P = H*W after a convolution, 1 after a
    dense layer) the bias is broadcast P times, so
    ``||x + b|| <= X + sqrt(P) norm_max`` and ``dl/db = sum_p g_p``, ``||dl/db|| <= sqrt(P) G``.
    Translation leaves gradients unchanged: Lip = 1.
    """

    def __init__(self, norm_max: float, **kwargs):
        super().__init__(**kwargs)
        self.norm_max = positive_number("DPAddBias norm_max", norm_max)

    def build(self, input_shape):
        self.positions = math.prod(int(d) for d in input_shape[1:-1])
        self.bias = self.add_weight(name="bias", shape=(int(input_shape[-1]),), initializer="zeros")
        super().build(input_shape)

    def call(self, inputs):
        return inputs + self.bias

    def output_bound(self, input_bound: float) -> float:
        norm = max(self.norm_max, current_value(lambda: tf.norm(self.bias)))  # a bias set by hand may exceed it
        return input_bound + math.sqrt(self.positions) * norm

    def parameter_gradient_bounds(self, input_bound, output_gradient_bound):
        return {self.bias.name: math.sqrt(self.positions) * output_gradient_bound}

    def project(self) -> None:
        limit = PROJECTION_TARGET * self.norm_max
        self.bias.assign(tf.clip_by_norm(self.bias, limit))

    def get_config(self):
        return {**super().get_config(), "norm_max": self.norm_max}


@tf.custom_gradient
def sort_channel_pairs(x: tf.Tensor):
    """GroupSort with groups of 2 that pair channel c with channel c + C/2:
    ``[a, b] -> [min(a, b), max(a, b)]``. A permutation of each example's entries, whose
    backward pass is the transposed permutation, ties included (a <= b keeps the order).

    Shapes come from the static shape: TF's Conv2D returns its *input's* shape on an empty
    batch (which Poisson sampling can draw), and an empty tensor reshapes to anything."""
    shape = (-1, *x.shape[1:])

    def halves(tensor):
        return tf.unstack(tf.reshape(tensor, (-1, 2, x.shape[-1] // 2)), axis=1)

    def merge(first, second):
        return tf.reshape(tf.stack([first, second], axis=1), shape)

    first, second = halves(x)
    in_order = first <= second

    def permuted_back(upstream):
        to_min, to_max = halves(upstream)
        return merge(tf.where(in_order, to_min, to_max), tf.where(in_order, to_max, to_min))

    return merge(tf.minimum(first, second), tf.maximum(first, second)), permuted_back


class DPGroupSort(DPLayer, GroupSort):
    """deel-lip's GroupSort: sorts each group of channels. A permutation of its input
    (per example), so norm preserving and 1-Lipschitz, and its backward pass must be the
    transposed permutation.

    Groups of 2 differ from deel-lip's in two ways. deel-lip's min/max backward pass sends
    both output gradients to one input at a tie ((g1, g2) -> (g1 + g2, 0): up to sqrt(2) G);
    here the backward pass is written out as the permutation. And deel-lip pairs adjacent
    channels (2c, 2c + 1), which strides through memory; pairing c with c + C/2 is the same
    function up to a fixed channel permutation and runs about twice as fast on CPU
    (``benchmarks/step_time.py``)."""

    def __init__(self, group_size: int = 2, **kwargs):
        _refuse_unbounded_options(kwargs, "DPGroupSort")
        if kwargs.get("data_format", "channels_last") != "channels_last":
            raise ValueError("DPGroupSort supports channels_last only.")
        super().__init__(n=group_size, **kwargs)

    def call(self, inputs):
        if self.n != 2:
            return super().call(inputs)  # tf.sort: its gradient is a permutation
        return sort_channel_pairs(inputs)

    def get_config(self):
        config = super().get_config()
        config["group_size"] = config.pop("n")
        return config


class DPScaledL2NormPooling2D(DPLayer, ScaledL2NormPooling2D):
    """deel-lip's L2-norm pooling over non-overlapping windows: each output is the norm
    of one window, so ``||out|| <= ||x||`` and each window's Jacobian row has norm <= 1.
    (deel-lip's backward pass divides by ``norm + eps``: never larger.)"""

    def __init__(self, pool_size=(2, 2), **kwargs):
        _refuse_unbounded_options(kwargs, "DPScaledL2NormPooling2D")
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        pool_size, strides = pair(pool_size), kwargs.pop("strides", None)
        if strides is not None and pair(strides) != pool_size:
            raise ValueError("DPScaledL2NormPooling2D needs strides == pool_size: overlapping windows are not 1-Lipschitz.")
        super().__init__(pool_size=pool_size, **kwargs)


class DPGlobalL2NormPooling2D(DPLayer, ScaledGlobalL2NormPooling2D):
    """deel-lip's global L2-norm pooling: one norm per channel, ``||out|| = ||x||``."""

    def __init__(self, **kwargs):
        _refuse_unbounded_options(kwargs, "DPGlobalL2NormPooling2D")
        super().__init__(**kwargs)


class DPFlatten(DPLayer, tf.keras.layers.Flatten):
    """Flatten: a reshape, norm preserving."""


class DPReshape(DPLayer, tf.keras.layers.Reshape):
    """Reshape: norm preserving."""

    def __init__(self, shape, **kwargs):
        super().__init__(target_shape=tuple(shape), **kwargs)

    def get_config(self):
        config = super().get_config()
        config["shape"] = config.pop("target_shape")
        return config


# ------------------------------------------------------------------- bound chaining
@dataclass
class ChainBounds:
    """Bounds along a chain of DP layers, for one example.

    ``input_bounds[k]`` bounds the input of layer k; ``output_gradient_bounds[k]`` bounds
    the gradient at its output; ``parameter_bounds`` maps variable names to bounds.
    """

    input_bounds: list[float] = field(default_factory=list)
    output_gradient_bounds: list[float] = field(default_factory=list)
    output_bound: float = 0.0
    input_gradient_bound: float = 0.0
    parameter_bounds: dict[str, float] = field(default_factory=dict)


def chain_bounds(layers: Sequence[DPLayer], input_bound: float, output_gradient_bound: float) -> ChainBounds:
    """Forward pass of norm bounds X_k, backward pass of gradient bounds G_k.

    X_k = rule_k(X_{k-1}); G_{k-1} = Lip_k G_k; each layer's parameter bound uses
    (X_{k-1}, G_k).
    """
    chain = ChainBounds()
    bound = input_bound
    for layer in layers:
        chain.input_bounds.append(bound)
        bound = layer.output_bound(bound)
    chain.output_bound = bound
    gradient = output_gradient_bound
    for layer, layer_input_bound in zip(reversed(layers), reversed(chain.input_bounds)):
        chain.output_gradient_bounds.insert(0, gradient)
        chain.parameter_bounds.update(layer.parameter_gradient_bounds(layer_input_bound, gradient))
        gradient = layer.input_gradient_bound(gradient)
    chain.input_gradient_bound = gradient
    return chain


def nested_layers(layers: Sequence[tf.keras.layers.Layer]):
    """Every layer, with the branches of residual blocks, in order."""
    for layer in layers:
        yield layer
        if isinstance(layer, DPResidual):
            yield from nested_layers(layer.branch)


def check_no_shared_layers(layers: Sequence[tf.keras.layers.Layer]) -> None:
    """A layer used twice would get one bound for two gradient contributions: refuse it."""
    seen = set()
    for layer in nested_layers(layers):
        if id(layer) in seen:
            raise ValueError(
                f"Layer '{layer.name}' is used twice in the model: its gradient would sum two "
                "contributions under one bound. Use separate layer objects."
            )
        seen.add(id(layer))


def check_dp_layer(layer) -> None:
    """Refuse layers without bound rules, and layers that mix examples."""
    if isinstance(layer, tf.keras.layers.BatchNormalization) or "BatchNorm" in type(layer).__name__:
        raise TypeError(
            f"Layer '{layer.name}' ({type(layer).__name__}) mixes the examples of a batch: "
            "one example's gradient then depends on the others, and no per-example bound "
            "holds. Remove it (Lipschitz networks do not need it)."
        )
    if not isinstance(layer, DPLayer):
        raise TypeError(
            f"Layer '{layer.name}' ({type(layer).__name__}) has no per-example gradient bound "
            "rules, so a DP model cannot calibrate its noise. Use the lipdp.layers "
            "equivalents (DPSpectralDense, DPSpectralConv2D, DPAddBias, DPGroupSort, ...)."
        )


class DPResidual(DPLayer, tf.keras.layers.Layer):
    """Residual block ``y = (x + f(x)) / 2`` over a branch f of DP layers.

    With f's own bounds: ``||y|| <= (X + X_f) / 2``; the branch sees gradient G/2 at its
    output; ``||dl/dx|| <= G/2 + G_f`` where G_f is the branch's input-gradient bound
    for top gradient G/2. With Lip_f <= 1 the block is 1-Lipschitz.
    """

    def __init__(self, branch: Sequence[tf.keras.layers.Layer], **kwargs):
        super().__init__(**kwargs)
        branch = list(branch)
        if not branch:
            raise ValueError("DPResidual needs at least one layer in its branch.")
        for layer in branch:
            check_dp_layer(layer)
            if isinstance(layer, DPBoundedInput):
                raise TypeError("DPBoundedInput belongs at the start of the model, not inside a residual branch.")
        self.branch = branch

    def build(self, input_shape):
        shape = tf.TensorShape(input_shape)
        for layer in self.branch:
            layer.build(shape)
            shape = tf.TensorShape(layer.compute_output_shape(shape))
        if shape[1:] != tf.TensorShape(input_shape)[1:]:
            raise ValueError(
                f"DPResidual branch maps shape {tuple(input_shape)[1:]} to {tuple(shape)[1:]}: "
                "a residual block needs the branch to keep the shape."
            )
        super().build(input_shape)

    def call(self, inputs):
        branch_output = inputs
        for layer in self.branch:
            branch_output = layer(branch_output)
        return 0.5 * (inputs + branch_output)

    def compute_output_shape(self, input_shape):
        return input_shape

    def _branch_bounds(self, input_bound: float, output_gradient_bound: float) -> ChainBounds:
        return chain_bounds(self.branch, input_bound, 0.5 * output_gradient_bound)

    def output_bound(self, input_bound: float) -> float:
        return 0.5 * (input_bound + self._branch_bounds(input_bound, 0.0).output_bound)

    def input_gradient_bound(self, output_gradient_bound: float) -> float:
        branch = self._branch_bounds(0.0, output_gradient_bound)
        return 0.5 * output_gradient_bound + branch.input_gradient_bound

    def parameter_gradient_bounds(self, input_bound, output_gradient_bound):
        return self._branch_bounds(input_bound, output_gradient_bound).parameter_bounds

    def project(self) -> None:
        for layer in self.branch:
            layer.project()

    def get_config(self):
        branch = [tf.keras.layers.serialize(layer) for layer in self.branch]
        return {**super().get_config(), "branch": branch}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["branch"] = [tf.keras.layers.deserialize(layer, custom_objects=CUSTOM_OBJECTS) for layer in config["branch"]]
        return cls(**config)


CUSTOM_OBJECTS = {
    cls.__name__: cls
    for cls in (
        DPBoundedInput, DPSpectralDense, DPSpectralConv2D, DPAddBias, DPGroupSort,
        DPScaledL2NormPooling2D, DPGlobalL2NormPooling2D, DPFlatten, DPReshape, DPResidual,
    )
}
