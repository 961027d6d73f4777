"""Every lipdp measurement in one command: speed, memory, accounting latency, accuracy.

* speed and memory (``step_time.py``): non-private vs clipless vs clipped on the same CNN;
* accounting latency (``accounting_latency.py``);
* accuracy (``accuracy.py``): Fashion-MNIST at epsilon 1, 3, 8 with the hyper-parameters
  that ``tune.py`` chose on a validation split; ``--quick`` trains the offline digits
  demo instead (no data file needed).

``--quick`` (about 1.5 minutes on 2 cores): batch sizes 256 and 1024, 5 repeats.
The full run: batch sizes 64 to 8192 (clipped: as far as memory allows), 10 repeats.
``--save`` writes ``benchmarks/results/results.json`` and the README's figures.
The last line with ``--json`` is one JSON object whose top level holds the step-time
ratios at batch 256: ``clipless_over_nonprivate`` and ``clipped_over_clipless``.

Run: python benchmarks/run.py [--quick] [--json] [--save] [--npz PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import platform
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # the sibling scripts, from any directory

import accounting_latency  # noqa: E402
import accuracy  # noqa: E402
import figures  # noqa: E402
import step_time  # noqa: E402
import tensorflow as tf  # noqa: E402

from lipdp import cli  # noqa: E402

QUICK_SIZES, FULL_SIZES = [256, 1024], [64, 128, 256, 512, 1024, 2048, 4096, 8192]


def quick_accuracy() -> dict:
    """The README's demo run (digits, epsilon 3): offline, a few seconds."""
    with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch log
        result = cli.train(cli.build_parser().parse_args(["train"]))
    print(f"{result['dataset']}  eps {result['epsilon']:.3f}  test accuracy {result['test_accuracy']:.4f}  "
          f"({result['seconds']:.1f} s of training)", flush=True)
    row = {"epsilon": result["epsilon"], "accuracy": result["test_accuracy"], "train_seconds": result["seconds"],
           "noise_multiplier": result["noise_multiplier"], "steps": result["steps"]}
    return {"dataset": result["dataset"], "delta": result["delta"], "demo": row}


def headline(speed: dict) -> dict:
    """The step-time ratios the issue asks for, at batch 256 (and 1024 when measured)."""
    ratios = {name: speed[256][name] for name in ("clipless_over_nonprivate", "clipped_over_clipless")}
    if 1024 in speed:
        ratios["clipped_over_clipless_at_1024"] = speed[1024]["clipped_over_clipless"]
        ratios["clipless_over_nonprivate_at_1024"] = speed[1024]["clipless_over_nonprivate"]
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 1.5 minutes: two batch sizes, the digits demo")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of all results")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/ (JSON and figures)")
    parser.add_argument("--npz", default=str(accuracy.FASHION), help="accuracy dataset of the full run")
    args = parser.parse_args()

    print(f"== speed and memory ({platform.processor() or platform.machine()}, TensorFlow {tf.__version__})", flush=True)
    speed = step_time.measure(QUICK_SIZES if args.quick else FULL_SIZES, 5 if args.quick else 10, memory=True)
    profile = step_time.clipless_profile(256, 5 if args.quick else 10)
    print(step_time.format_profile(256, profile), flush=True)
    print("== accounting latency", flush=True)
    latency = accounting_latency.measure()
    print(accounting_latency.summary(latency), flush=True)
    print("== accuracy", flush=True)
    accuracy_results = quick_accuracy() if args.quick else accuracy.run(args.npz, [1.0, 3.0, 8.0], non_private=True)

    results = {**headline(speed), "quick": args.quick, "speed": {str(size): row for size, row in speed.items()},
               "clipless_profile_256": profile,
               "accounting": latency, "accuracy": accuracy_results}
    if args.save:
        figures.RESULTS.mkdir(parents=True, exist_ok=True)
        (figures.RESULTS / "results.json").write_text(json.dumps(results, indent=1) + "\n")
        for path in figures.save_figures(results):
            print(f"wrote {path}")
    ratios = headline(speed)
    print("== " + ", ".join(f"{name} {value:.2f}" for name, value in ratios.items()))
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
