"""How long the accountant takes: epsilon after 10^4 steps, and sigma for a target epsilon.

The setting of a long Fashion-MNIST run: q = 256 / 60000, 10^4 steps, delta = 1e-5.
The caches of lipdp.accounting are bypassed (``__wrapped__``), so each call computes.
Run: python benchmarks/accounting_latency.py [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from lipdp import accounting

SAMPLING_RATE, STEPS, DELTA, SIGMA, TARGET_EPSILON = 256 / 60000, 10_000, 1e-5, 1.0, 3.0


def timed(function, *args, **kwargs) -> tuple[float, float]:
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def measure() -> dict:
    epsilon, pld_seconds = timed(accounting.compute_epsilon.__wrapped__, SIGMA, SAMPLING_RATE, STEPS, DELTA)
    rdp_epsilon, rdp_seconds = timed(accounting.compute_epsilon.__wrapped__, SIGMA, SAMPLING_RATE, STEPS, DELTA, "rdp")
    sigma, calibration_seconds = timed(
        accounting.calibrate_noise_multiplier.__wrapped__, TARGET_EPSILON, SAMPLING_RATE, STEPS, DELTA)
    return {
        "setting": {"sampling_rate": SAMPLING_RATE, "steps": STEPS, "delta": DELTA},
        "epsilon_pld": epsilon, "epsilon_pld_seconds": pld_seconds,
        "epsilon_rdp": rdp_epsilon, "epsilon_rdp_seconds": rdp_seconds,
        "calibrated_sigma": sigma, "calibration_target_epsilon": TARGET_EPSILON,
        "calibration_seconds": calibration_seconds,
    }


def summary(row: dict) -> str:
    return (f"accounting (q = {SAMPLING_RATE:.4g}, {STEPS} steps, delta {DELTA:g}): "
            f"sigma {SIGMA} -> eps {row['epsilon_pld']:.3f} by PLD in {row['epsilon_pld_seconds']:.2f} s "
            f"(RDP {row['epsilon_rdp']:.3f} in {row['epsilon_rdp_seconds']:.2f} s); "
            f"sigma for eps {TARGET_EPSILON:g}: {row['calibrated_sigma']:.4f} in {row['calibration_seconds']:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    row = measure()
    print(summary(row))
    if args.json:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
