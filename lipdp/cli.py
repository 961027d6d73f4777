"""``python -m lipdp train`` (or ``lipdp train``): train a private model, report accuracy and epsilon.

The default run trains on scikit-learn's digits, offline, at epsilon = 3.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import tensorflow as tf

from lipdp import accounting, datasets, presets
from lipdp.callbacks import PrivacyBudget
from lipdp.clipping import DPClippedModel
from lipdp.model import DPParameters
from lipdp.sampling import expected_batch_size_to_rate, steps_per_epoch

DEFAULT_EPSILON = 3.0
MODES = ("clipless", "clipped", "non-private")


def default_delta(num_examples: int) -> float:
    """1e-5, or the first power of ten below 1/N for datasets of 100k examples or more."""
    delta = 1e-5
    while delta >= 1.0 / num_examples:
        delta /= 10
    return delta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lipdp", description="Clipless DP-SGD on Lipschitz networks.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a private model; print test accuracy and epsilon")
    train.add_argument("--dataset", default="digits", help="digits (default, offline), mnist, fashion_mnist, cifar10, or a path to an .npz")
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--epsilon", type=float, help=f"target epsilon; sigma is calibrated to it (default {DEFAULT_EPSILON})")
    budget.add_argument("--noise-multiplier", type=float, help="sigma, instead of a target epsilon")
    train.add_argument("--delta", type=float, help="delta (default: 1e-5, or below 1/N)")
    train.add_argument("--epochs", type=int, help="epochs of round(N / batch size) steps (default per dataset)")
    train.add_argument("--batch-size", type=int, help="the *expected* batch size of Poisson sampling (default per dataset)")
    train.add_argument("--mode", choices=MODES, default="clipless",
                       help="clipless (default), clipped (DP-SGD with per-example clipping), non-private")
    train.add_argument("--clip", type=float, default=1.0, help="per-example clipping norm C of --mode clipped")
    train.add_argument("--loss", choices=presets.LOSSES, default="tau-cce")
    train.add_argument("--model", choices=presets.PRESETS, help="model preset (default per dataset)")
    train.add_argument("--lr", type=float, help="Adam learning rate (default per dataset)")
    train.add_argument("--seed", type=int, help="seed of the initial weights (the batches and the noise are never seeded)")
    train.add_argument("--data-dir", help="TensorFlow Datasets data directory")
    train.add_argument("--json", action="store_true", help="end with one JSON line of results")
    return parser


def _check_arguments(args) -> None:
    """Refuse bad numbers before loading anything."""
    if args.epsilon is not None:
        accounting.check_epsilon(args.epsilon)
    if args.noise_multiplier is not None:
        accounting.check_noise_multiplier(args.noise_multiplier)
    if args.delta is not None:
        accounting.check_delta(args.delta)
    for name in ("epochs", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive number, got {args.lr}.")
    if not (math.isfinite(args.clip) and args.clip > 0):
        raise ValueError(f"--clip must be a positive number, got {args.clip}.")
    if args.mode == "non-private" and (args.epsilon is not None or args.noise_multiplier is not None):
        raise ValueError("--mode non-private adds no noise: drop --epsilon / --noise-multiplier.")


def train(args) -> dict:
    """Load, calibrate, train, evaluate; return the results."""
    _check_arguments(args)
    (x_train, y_train), (x_test, y_test), info = datasets.load(args.dataset, args.data_dir)
    defaults = presets.training_defaults(info)
    delta = args.delta if args.delta is not None else default_delta(info.num_train)
    if delta >= 1.0 / info.num_train:
        print(f"warning: delta={delta} >= 1/N = {1 / info.num_train:.3g}: such a delta allows leaking "
              "whole examples; use a delta below 1/N.", file=sys.stderr)
    epochs = args.epochs or defaults.epochs
    batch_size = args.batch_size or defaults.batch_size
    sampling_rate = expected_batch_size_to_rate(batch_size, info.num_train)
    steps = epochs * steps_per_epoch(info.num_train, batch_size)
    private = args.mode != "non-private"
    target = None if args.noise_multiplier or not private else (args.epsilon or DEFAULT_EPSILON)
    sigma = args.noise_multiplier or (
        accounting.calibrate_noise_multiplier(target, sampling_rate, steps, delta) if private else None)

    if args.seed is not None:  # the initial weights only: batches and noise stay secret
        tf.keras.utils.set_random_seed(args.seed)
    model_name = args.model or defaults.model
    model = _build(args, info, model_name, DPParameters(sigma, delta) if private else None)
    model.compile(
        optimizer=tf.keras.optimizers.Adam(args.lr or defaults.learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True) if args.mode == "clipped"
        else presets.make_loss(args.loss, info, defaults.logit_scale),
        metrics=["accuracy"],
    )
    callbacks = [PrivacyBudget(target)] if target else []
    start = time.perf_counter()
    print("Training. The loss and accuracy shown per epoch are measured on private training "
          "batches: they are not covered by the privacy guarantee.")
    history = model.fit(
        x_train, y_train, batch_size=batch_size, epochs=epochs,
        callbacks=callbacks, verbose=1 if sys.stdout.isatty() else 2,
    )
    seconds = time.perf_counter() - start
    _, test_accuracy = model.evaluate(x_test, y_test, verbose=0)
    statement = model.privacy_statement() if private else None
    return {
        "dataset": info.name, "mode": args.mode, "model": model_name,
        "loss": "cross-entropy" if args.mode == "clipped" else args.loss,
        "clip": args.clip if args.mode == "clipped" else None,
        "test_accuracy": float(test_accuracy),
        "epsilon": statement.epsilon if private else None,  # null: no privacy guarantee
        "target_epsilon": target, "delta": delta if private else None, "noise_multiplier": sigma,
        "sampling_rate": sampling_rate, "expected_batch_size": batch_size, "epochs": len(history.epoch),
        "steps": model.privacy_ledger.steps, "seconds": round(seconds, 2), "sampling": "Poisson sampling",
        "neighbouring_relation": accounting.NEIGHBOURING_RELATION, "accountant": "pld",
        "statement": repr(statement) if private else "no privacy guarantee: trained without noise",
    }


def _build(args, info, model_name: str, dp_parameters):
    """The clipless DP model, or for --mode clipped the unconstrained Keras counterpart
    wrapped for per-example clipping."""
    if args.mode == "clipped":
        return DPClippedModel(presets.build_keras_model(model_name, info), dp_parameters, clip_norm=args.clip)
    return presets.build_model(model_name, info, dp_parameters)


def summary(result: dict) -> str:
    if result["epsilon"] is None:
        privacy = ["epsilon         none: trained without noise (no privacy guarantee)"]
    else:
        privacy = [
            f"epsilon         {result['epsilon']:.3f}" + (f"   (target {result['target_epsilon']})" if result["target_epsilon"] else ""),
            f"delta           {result['delta']:.3g}",
            f"sigma           {result['noise_multiplier']:.4f}   (noise multiplier)",
        ]
    return "\n".join([
        f"test accuracy   {result['test_accuracy']:.4f}   ({result['dataset']}, held-out test set, {result['mode']})",
        *privacy,
        f"steps           {result['steps']}   ({result['epochs']} epochs, expected batch {result['expected_batch_size']}, q = {result['sampling_rate']:.4g})",
        f"seconds         {result['seconds']:.1f}",
        f"guarantee       {result['statement']}",
    ])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = train(args)
    except (ValueError, TypeError, accounting.BudgetExhaustedError) as error:
        print(f"lipdp: error: {error}", file=sys.stderr)
        return 2
    print(summary(result))
    if args.json:
        print(json.dumps(result))
    return 0
