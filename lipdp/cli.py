"""``python -m lipdp train`` (or ``lipdp train``): train a private model, report accuracy and epsilon.
``python -m lipdp audit``: membership-inference audit of a non-private and a private model.

The default runs use scikit-learn's digits, offline: ``train`` at epsilon = 3, ``audit`` at
epsilon = 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import tensorflow as tf

from lipdp import accounting, datasets, presets
from lipdp import audit as membership
from lipdp.callbacks import PrivacyBudget
from lipdp.clipping import DPClippedModel
from lipdp.model import DPParameters
from lipdp.sampling import expected_batch_size_to_rate, steps_per_epoch

DEFAULT_EPSILON = 3.0
# The audit's private model: epsilon = 1 caps TPR at about 2.7 % at FPR 1 %, a bound the
# non-private model's LiRA ROC visibly crosses on digits.
DEFAULT_AUDIT_EPSILON = 1.0
DEFAULT_SHADOW_MODELS = 16
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
    add_audit_parser(commands)
    return parser


def add_audit_parser(commands) -> None:
    audit = commands.add_parser(
        "audit", help="membership-inference audit of a non-private and a private model; print AUC, TPR at low FPR, epsilon")
    audit.add_argument("--dataset", default="digits", help="digits (default, offline), mnist, fashion_mnist, cifar10, or a path to an .npz")
    audit.add_argument("--epsilon", type=float, default=DEFAULT_AUDIT_EPSILON,
                       help=f"epsilon of the private model (default {DEFAULT_AUDIT_EPSILON})")
    audit.add_argument("--delta", type=float, help="delta (default: 1e-5, or below 1/N)")
    audit.add_argument("--epochs", type=int, help="epochs of each training run (default per dataset)")
    audit.add_argument("--shadow-models", type=int, default=DEFAULT_SHADOW_MODELS,
                       help=f"shadow models per audited model for LiRA, an even number >= 4 (default {DEFAULT_SHADOW_MODELS}; 0: loss attack only)")
    audit.add_argument("--seed", type=int, default=0, help="seed of the membership splits (default 0; never the training noise)")
    audit.add_argument("--data-dir", help="TensorFlow Datasets data directory")
    audit.add_argument("--json", action="store_true", help="end with one JSON line of results")


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


def _check_audit_arguments(args) -> None:
    accounting.check_epsilon(args.epsilon)
    if args.delta is not None:
        accounting.check_delta(args.delta)
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs must be a positive integer, got {args.epochs}.")
    if args.shadow_models != 0 and (args.shadow_models < 4 or args.shadow_models % 2):
        raise ValueError(f"--shadow-models must be 0 or an even number >= 4 (LiRA trains them in "
                         f"complementary pairs and needs 2 in and 2 out per example), got {args.shadow_models}.")


def audit(args) -> dict:
    """Pool train and test data, train each model on its members (a fair coin per example), attack, report."""
    _check_audit_arguments(args)
    (x_train, y_train), (x_test, y_test), info = datasets.load(args.dataset, args.data_dir)
    x, y = np.concatenate([x_train, x_test]), np.concatenate([y_train, y_test])
    delta = args.delta if args.delta is not None else default_delta(len(x) // 2)
    primary = "lira" if args.shadow_models else "loss"
    result = {"dataset": info.name, "pool": len(x), "shadow_models": args.shadow_models, "primary_attack": primary}
    for name, epsilon in (("non_private", None), ("private", args.epsilon)):
        start = time.perf_counter()
        trainer = membership.preset_trainer(info, epsilon, delta, args.epochs)
        run = membership.audit_training(trainer, x, y, args.shadow_models, delta, args.seed)
        audits = run.audits
        _, accuracy = run.model.evaluate(x[~run.members], y[~run.members], verbose=0)
        result[name] = {
            **audits[primary].as_dict(),
            "epsilon": audits[primary].accounted_epsilon,  # null: no privacy guarantee
            "noise_multiplier": run.model.dp_parameters.noise_multiplier if epsilon else None,
            "non_member_accuracy": float(accuracy),
            "attacks": {attack: report.as_dict() for attack, report in audits.items()},
            "seconds": round(time.perf_counter() - start, 2),
        }
    return result


def audit_summary(result: dict) -> str:
    models = (result["non_private"], result["private"])
    lira = f" with {result['shadow_models']} shadow models" if result["primary_attack"] == "lira" else ""

    def row(label: str, cell) -> str:
        return f"{label:<36s}" + "".join(f"{cell(model):<30s} " for model in models)

    def attack_rows(attack: str) -> list[str]:
        pick = lambda model: model["attacks"][attack]  # noqa: E731
        return [
            f"{attack} attack" + (lira if attack == "lira" else " (score: -loss)"),
            row("  AUC [95% CI]", lambda m: f"{pick(m)['auc']:.3f} [{pick(m)['auc_ci95'][0]:.3f}, {pick(m)['auc_ci95'][1]:.3f}]"),
            row("  TPR at FPR 1%", lambda m: f"{pick(m)['tpr_at_fpr_1pct']:.4f}"),
            row("  TPR at FPR 0.1%", lambda m: f"{pick(m)['tpr_at_fpr_0.1pct']:.4f}"),
            row("  empirical epsilon (point, noisy)", lambda m: _epsilon_text(pick(m)['empirical_epsilon'])),
            row("  epsilon lower bound (95%)", lambda m: f"{pick(m)['empirical_epsilon_lower_bound']:.3f}"),
        ]

    private = result["private"]
    return "\n".join([
        f"Membership-inference audit on {result['dataset']}: a fair coin per example picks each model's "
        f"members ({private['members']} of {result['pool']} examples); the others are the non-members.",
        row("", lambda m: "private" if m["epsilon"] is not None else "non-private"),
        row("accounted epsilon (guarantee)", lambda m: "none" if m["epsilon"] is None else f"{m['epsilon']:.3f} (delta {m['delta']:.0e})"),
        row("accuracy on non-members", lambda m: f"{m['non_member_accuracy']:.3f}"),
        *[line for attack in private["attacks"] for line in attack_rows(attack)],
        "An audit gives a *lower* bound on epsilon for one attack: a small one proves nothing; only the",
        "accounted epsilon is a guarantee. Intervals treat examples as independent trials (indicative).",
        "The audit is computed on the training data: its own numbers are not private.",
    ])


def _epsilon_text(value) -> str:
    return "unbounded (no false positive)" if value is None else f"{value:.3f}"


COMMANDS = {"train": (train, summary), "audit": (audit, audit_summary)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run, describe = COMMANDS[args.command]
    try:
        result = run(args)
    except (ValueError, TypeError, accounting.BudgetExhaustedError) as error:
        print(f"lipdp: error: {error}", file=sys.stderr)
        return 2
    print(describe(result))
    if args.json:
        print(json.dumps(result))
    return 0
