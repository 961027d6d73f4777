"""GradientMonitor: per-example norms against bounds and signal-to-noise, per epoch."""

import numpy as np
import tensorflow as tf

import lipdp
from lipdp import presets
from lipdp.callbacks import GradientMonitor


def test_monitor_records_fractions_and_signal_to_noise(digits):
    (x, y), (x_test, y_test), info = digits
    model = presets.build_model("dense", info, lipdp.DPParameters(2.0, 1e-5))
    model.compile(tf.keras.optimizers.Adam(1e-2), loss=presets.make_loss("tau-cce", info, 20.0))
    monitor = GradientMonitor(x_test[:64], y_test[:64], every=2)
    model.fit(x, y, batch_size=256, epochs=5, verbose=0, callbacks=[monitor])
    assert [r["epoch"] for r in monitor.records] == [2, 4, 5]  # every 2 epochs, and the last
    names = {v.name for v in model.trainable_variables}
    for record in monitor.records:
        assert record["data"] == "held-out data"
        assert set(record["max_fraction_of_bound"]) == names
        assert all(0 < f <= 1 for f in record["max_fraction_of_bound"].values())
        assert all(record["median_fraction_of_bound"][n] <= record["max_fraction_of_bound"][n] for n in names)
        assert all(s > 0 for s in record["signal_to_noise"].values())
    # the signal-to-noise ratio is 1 / (noise norm on the mean gradient / its norm)
    ratios = lipdp.bounds.noise_to_signal(model, x_test[:64], y_test[:64], model._expected_batch_size)
    last = monitor.records[-1]["signal_to_noise"]
    assert all(np.isclose(last[n], 1 / ratios[n], rtol=1e-4) for n in names)


def test_monitor_on_training_data_is_labelled_not_private():
    assert "not private" in GradientMonitor(None, None, on_training_data=True).label
