"""lipdp: differentially private training of 1-Lipschitz networks without per-example
clipping (Clipless DP-SGD, Bethune et al., ICLR 2024).

Importing lipdp switches TensorFlow to legacy Keras (tf-keras) first: deel-lip needs it.
"""

from lipdp import _legacy_keras  # noqa: F401  (must run before anything touches tf.keras)
from lipdp import accounting, audit, bounds, callbacks, certify, datasets, layers, losses, plots, sampling
from lipdp.accounting import PrivacyStatement, calibrate_noise_multiplier, compute_epsilon
from lipdp.bounds import gradient_bounds, per_example_gradient_norms
from lipdp.callbacks import PrivacyBudget
from lipdp.model import DPParameters, DPSequential

__version__ = "0.1.0"

__all__ = [
    "DPParameters", "DPSequential", "PrivacyBudget", "PrivacyStatement",
    "accounting", "audit", "bounds", "callbacks", "certify", "calibrate_noise_multiplier", "compute_epsilon",
    "datasets", "gradient_bounds", "layers", "losses", "per_example_gradient_norms", "plots", "sampling",
]
