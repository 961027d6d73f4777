"""Responsiveness of the Playground: slider-to-readout latency and a default digits run.

Prints the time from a control change to the refreshed readout (first time a setting is
seen: sigma must be calibrated; again: cached), and the duration of a default run with
its live plots. Run: python benchmarks/playground_latency.py
"""

import statistics
import time

from lipdp.widgets import Playground


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


if __name__ == "__main__":
    construction = timed(lambda: globals().update(playground=Playground()))
    print(f"Playground construction: {construction:.2f} s")
    epsilons = [1.0, 1.5, 2.0, 4.0, 6.0]
    fresh = [timed(lambda e=e: playground.set(epsilon=e)) for e in epsilons]
    cached = [timed(lambda e=e: playground.set(epsilon=e)) for e in epsilons]
    batches = [timed(lambda b=b: playground.set(batch_size=b)) for b in (128, 256, 384)]
    print(f"epsilon slider, new setting (calibrates sigma): median {statistics.median(fresh) * 1000:.0f} ms, "
          f"max {max(fresh) * 1000:.0f} ms")
    print(f"epsilon slider, setting seen before (cached):   median {statistics.median(cached) * 1000:.0f} ms")
    print(f"batch-size slider, new setting:                 median {statistics.median(batches) * 1000:.0f} ms")
    playground.set(epsilon=3.0, batch_size=512)
    results = playground.train()
    print(f"default digits run: {results['seconds']:.1f} s of training, {results['steps']} steps, "
          f"test accuracy {results['test_accuracy']:.3f} at epsilon {results['epsilon']:.3f}")
