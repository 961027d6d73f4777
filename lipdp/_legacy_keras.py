"""Switch TensorFlow to legacy Keras (tf-keras, Keras 2) before anything builds ``tf.keras``.

deel-lip 1.5 only works with Keras 2: under Keras 3 its weighted layers and its
``Sequential`` fail. TensorFlow >= 2.16 decides which Keras ``tf.keras`` means the
first time ``tf.keras`` is touched, reading ``TF_USE_LEGACY_KERAS`` then. So this module
sets the variable, imports TensorFlow and checks that the switch took effect.
"""

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402  (must come after the environment switch)
from tensorflow.python.tools import module_util  # noqa: E402

KERAS_3_ALREADY_BOUND = (
    "lipdp needs legacy Keras (the tf-keras package), but this Python process already "
    "bound tf.keras to Keras 3. Fix: restart the kernel/interpreter and run "
    "`import lipdp` before anything uses tf.keras (or set TF_USE_LEGACY_KERAS=1 before "
    "starting Python)."
)


def _route_tensorflow_keras_imports() -> None:
    """Make ``import tensorflow.keras...`` (deel-lip's style) find tf-keras too.

    TensorFlow does this at its own import when TF_USE_LEGACY_KERAS is already set: it
    puts tf-keras's API folder first on ``tensorflow.__path__``. If TensorFlow was
    imported before lipdp, that step was skipped; repeat it.
    """
    legacy_dir = module_util.get_parent_dir_for_name("tf_keras.api._v2.keras")
    if legacy_dir and legacy_dir not in tf.__path__:
        tf.__path__.insert(0, legacy_dir)


def _check_legacy_keras() -> None:
    try:
        layer_module = tf.keras.layers.Layer.__module__
    except ImportError as error:  # tf-keras missing
        raise ImportError(
            "lipdp needs the tf-keras package matching your TensorFlow: "
            f"pip install 'tf-keras~={tf.__version__.rsplit('.', 1)[0]}.0'"
        ) from error
    imported = sys.modules.get("tensorflow.keras")
    imported_module = getattr(getattr(imported, "layers", None), "Layer", tf.keras.layers.Layer).__module__
    if not (layer_module.startswith("tf_keras") and imported_module.startswith("tf_keras")):
        raise ImportError(KERAS_3_ALREADY_BOUND)


_route_tensorflow_keras_imports()
_check_legacy_keras()
