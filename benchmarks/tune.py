"""Choose the hyper-parameters of benchmarks/accuracy.py on a validation split.

Tuning on the test set would report an optimistic, uncounted number. So the training
data are split once (5/6 fit, 1/6 validation, fixed seed); for each epsilon a
coordinate search changes one hyper-parameter at a time, keeps the value with the best
validation accuracy, and writes the winners, with every trial, to
``benchmarks/accuracy_config.json``. The test split is never read here.
(Tuning itself spends privacy in a strict reading, which DP-SGD papers, ours included,
do not count; see the README.)

Run: python benchmarks/tune.py [--npz PATH] [--epsilons 1 3 8] [--passes 1]
"""

from __future__ import annotations

import argparse
import json

from accuracy import CONFIG, FASHION, format_epsilon, train_and_evaluate, validation_split
from lipdp.datasets import load_npz

START = {"hidden": [256], "batch_size": 4096, "epochs": 40, "lr": 1e-3, "logit_scale": 40.0, "loss_gradient_clip": None}
# Each search step tries these changes. Batch size and epochs move together: a larger
# batch takes fewer steps per epoch, and DP-SGD wants both large batches and many steps.
# The loss-gradient clip C (the tau cross-entropy's constant is sqrt(2)) lowers every
# bound, hence the noise, by C / sqrt(2).
SEARCH = {
    "logit_scale": [{"logit_scale": value} for value in (20.0, 40.0, 80.0, 160.0)],
    "loss_gradient_clip": [{"loss_gradient_clip": value} for value in (None, 0.7, 0.35, 0.15)],
    "hidden": [{"hidden": widths} for widths in ([64], [256], [512], [256, 256])],
    "schedule": [{"batch_size": size, "epochs": epochs}
                 for size, epochs in ((1024, 10), (4096, 40), (8192, 80), (16384, 160))],
    "lr": [{"lr": value} for value in (1e-3, 3e-3, 1e-2)],
}
# A final run must fit the 10-minute budget on 2 cores.
MAX_TRAIN_SECONDS = 600


def coordinate_search(epsilon: float, fit, validation, info, passes: int) -> tuple[dict, list[dict]]:
    """Greedy: for each hyper-parameter in turn, keep its best value given the others
    (runs over the time budget never win)."""
    trials: dict[str, dict] = {}

    def score(spec: dict) -> float:
        key = json.dumps(spec, sort_keys=True)
        if key not in trials:
            result = train_and_evaluate(spec, fit, validation, info, epsilon)
            trials[key] = {"spec": spec, "validation_accuracy": result["accuracy"],
                           "train_seconds": result["train_seconds"]}
            print(f"eps {epsilon:g}  {key}  validation {result['accuracy']:.4f}  {result['train_seconds']:.0f} s", flush=True)
        trial = trials[key]
        return trial["validation_accuracy"] if trial["train_seconds"] <= MAX_TRAIN_SECONDS else -1.0

    best = dict(START)
    for _ in range(passes):
        for changes in SEARCH.values():
            best = max(({**best, **change} for change in changes), key=score)
    return best, list(trials.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--npz", default=str(FASHION))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
    parser.add_argument("--passes", type=int, default=1)
    args = parser.parse_args()
    train, _, info = load_npz(args.npz)
    fit, validation = validation_split(train)
    configs, trials = {}, {}
    for epsilon in args.epsilons:
        best, tried = coordinate_search(epsilon, fit, validation, info, args.passes)
        configs[format_epsilon(epsilon)] = best
        trials[format_epsilon(epsilon)] = tried
        print(f"eps {epsilon:g}: chose {json.dumps(best)}", flush=True)
    CONFIG.write_text(json.dumps({
        "dataset": info.name, "validation": "last 1/6 of a seeded permutation of the training split",
        "configs": configs, "trials": trials,
    }, indent=1) + "\n")
    print(f"wrote {CONFIG}")


if __name__ == "__main__":
    main()
