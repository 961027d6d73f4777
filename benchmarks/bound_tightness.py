"""How close do measured per-example gradient norms come to the analytic bounds?

Prints, per variable, the largest and the median ratio measured / bound, for the CLI
presets: at initialisation and after a short private training run. Ratios near 1 mean
the noise is not wasted; ratios far below 1 mean the bound is loose for real data.
Run: python benchmarks/bound_tightness.py [--fashion PATH_TO_fashion_mnist.npz]
"""

import argparse

import numpy as np
import tensorflow as tf

import lipdp
from lipdp import datasets, presets


def ratios(model, x, y):
    bounds = lipdp.gradient_bounds(model)
    norms = lipdp.per_example_gradient_norms(model, x, y)
    return {name: (norms[name].max() / bounds[name], np.median(norms[name]) / bounds[name]) for name in bounds}


def report(name, preset, data, epochs):
    (x, y), _, info = data
    defaults = presets.training_defaults(info)
    tf.keras.utils.set_random_seed(0)
    model = presets.build_model(preset, info, lipdp.DPParameters(1.0, 1e-5))
    model.compile(tf.keras.optimizers.Adam(defaults.learning_rate), loss=presets.make_loss("tau-cce", info, defaults.logit_scale))
    sample = np.random.default_rng(0).choice(len(x), 256, replace=False)
    before = ratios(model, x[sample], y[sample])
    model.fit(x, y, batch_size=defaults.batch_size, epochs=epochs, verbose=0)
    after = ratios(model, x[sample], y[sample])
    print(f"\n{name} / {preset}: measured / bound over 256 training examples (max, median)")
    for variable in before:
        print(f"  {variable:40s} init {before[variable][0]:.3f} {before[variable][1]:.3f}   "
              f"trained {after[variable][0]:.3f} {after[variable][1]:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fashion", help="path to fashion_mnist.npz (optional)")
    args = parser.parse_args()
    report("digits", "dense", datasets.load("digits"), epochs=10)
    if args.fashion:
        report("fashion_mnist", "conv", datasets.load(args.fashion), epochs=1)
