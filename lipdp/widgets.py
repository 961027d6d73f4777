"""The Playground: slide epsilon, sigma, delta, batch size, radius... and watch.

The readout (calibrated sigma, epsilon, steps, noise std per variable) updates as soon as
a slider moves, before any training. Training runs in a background thread so that the
Stop button stays live; plots are redrawn after every epoch by a Keras callback.

It is also drivable without a browser::

    playground = Playground(epochs=3)
    playground.set(epsilon=2.0, batch_size=256)
    playground.readout()          # {'noise_multiplier': ..., 'steps': ..., ...}
    results = playground.train()  # blocks; returns accuracy, epsilon, history
"""

from __future__ import annotations

import io
import os
import threading
import time

import ipywidgets as w
import numpy as np
import tensorflow as tf

from lipdp import accounting, datasets, losses, plots, presets
from lipdp.bounds import gradient_bounds
from lipdp.callbacks import GradientMonitor
from lipdp.model import DPParameters, noise_stddevs
from lipdp.sampling import expected_batch_size_to_rate, steps_per_epoch

SMOKE = os.environ.get("LIPDP_SMOKE") == "1"
MONITOR_EXAMPLES = 64  # held-out examples whose per-example gradients are plotted
MAX_REDRAWS = 8  # live plots are redrawn at most this many times per run


def figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72)
    return buffer.getvalue()


def relabel(model, by_variable: dict) -> dict:
    """Variable names -> stable labels ("2. DPSpectralDense kernel"), the same for every
    model the playground builds (Keras numbers each new layer's name afresh)."""
    labels = {}
    for position, layer in enumerate(model.layers):
        for variable in layer.trainable_variables:
            short = variable.name.split("/")[-1].split(":")[0]
            labels[variable.name] = f"{position}. {type(layer).__name__} {short}"
    return {labels[name]: value for name, value in by_variable.items()}


class LivePlots(GradientMonitor):
    """The Playground's monitor: on held-out data, at most MAX_REDRAWS times a run, it
    measures per-example gradients against their bounds and redraws the three plots
    (held-out accuracy, gradient norms vs bounds, epsilon spent vs budget)."""

    def __init__(self, playground: "Playground", x_monitor, y_monitor):
        super().__init__(x_monitor, y_monitor)
        self.playground = playground
        self.history: dict[str, list] = {}

    def on_train_begin(self, logs=None):
        self.every = max(1, self.params["epochs"] // MAX_REDRAWS)

    def on_train_batch_end(self, batch, logs=None):
        if self.playground.stop_requested:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        if self.due(epoch):
            super().on_epoch_end(epoch, logs)
            self.playground.show_training(self.model, self.history, self.latest_norms)


class Playground:
    """One ipywidgets app over :mod:`lipdp`: controls, an instant readout, live plots."""

    def __init__(self, dataset: str = "digits", epochs: int | None = None):
        self._data_cache: dict = {}
        self.stop_requested = False
        self.results: dict | None = None
        self._thread: threading.Thread | None = None
        train, _, info = self._data(dataset)
        defaults = presets.training_defaults(info)
        style = {"description_width": "150px"}
        layout = w.Layout(width="420px")

        def slider(kind, **kwargs):
            return kind(style=style, layout=layout, continuous_update=False, **kwargs)

        self.controls = {
            "dataset": w.Dropdown(options=datasets.available(), value=dataset, description="dataset", style=style),
            "budget_by": w.ToggleButtons(options=["epsilon", "sigma"], value="epsilon", description="set", style=style),
            "epsilon": slider(w.FloatLogSlider, value=3.0, base=10, min=-1, max=1.3, step=0.05, description="target ε"),
            "sigma": slider(w.FloatSlider, value=1.0, min=0.3, max=10.0, step=0.05, description="noise multiplier σ"),
            "delta": slider(w.FloatLogSlider, value=1e-5, base=10, min=-8, max=-3, step=0.5, description="δ"),
            "batch_size": slider(w.IntSlider, value=defaults.batch_size, min=8, max=info.num_train, step=8,
                                 description="expected batch size"),
            "epochs": slider(w.IntSlider, value=epochs or (2 if SMOKE else defaults.epochs), min=1, max=100,
                             description="epochs"),
            "radius": slider(w.FloatSlider, value=info.input_radius, min=0.1, max=4 * info.input_radius, step=0.1,
                             description="input radius R"),
            "learning_rate": slider(w.FloatLogSlider, value=defaults.learning_rate, base=10, min=-4, max=-0.5,
                                    step=0.25, description="learning rate"),
            "loss_clip": slider(w.FloatSlider, value=0.0, min=0.0, max=2.0, step=0.05,
                                description="loss-gradient clip C (0: off)"),
        }
        self.train_button = w.Button(description="Train", button_style="success", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.readout_html = w.HTML()
        self.status = w.HTML("Move a slider: the readout follows at once. Then press Train.")
        self.images = {name: w.Image(format="png", layout=w.Layout(width="auto", max_width="100%"))
                       for name in ("accuracy", "gradients", "budget")}
        self.train_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self.controls["dataset"].observe(lambda change: self.fit_controls_to(self._data(change["new"])[2]), names="value")
        for control in self.controls.values():
            control.observe(lambda _: self._refresh(), names="value")
        self.widget = w.VBox([
            w.HBox([w.VBox(list(self.controls.values()) + [w.HBox([self.train_button, self.stop_button])]),
                    w.VBox([self.readout_html, self.status])]),
            w.HBox([self.images["accuracy"], self.images["budget"]]),
            self.images["gradients"],
        ])
        self._refresh()

    def fit_controls_to(self, info: datasets.DatasetInfo) -> None:
        """Ranges and defaults for a newly chosen dataset (batch size up to N, its radius)."""
        defaults = presets.training_defaults(info)
        batch, radius = self.controls["batch_size"], self.controls["radius"]
        batch.max, batch.value = info.num_train, min(defaults.batch_size, info.num_train)
        radius.max, radius.value = 4 * info.input_radius, info.input_radius
        self.controls["learning_rate"].value = defaults.learning_rate

    # ----------------------------------------------------------------- headless API
    def set(self, **values) -> None:
        """Set controls by name (the readout refreshes)."""
        for name, value in values.items():
            if name not in self.controls:
                raise ValueError(f"Unknown control {name!r}: use one of {sorted(self.controls)}.")
            self.controls[name].value = value

    @property
    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)

    # --------------------------------------------------------------------- readout
    def _data(self, name: str):
        if name not in self._data_cache:
            self._data_cache[name] = datasets.load(name)
        return self._data_cache[name]

    def _info(self):
        return self._data(self.controls["dataset"].value)[2]

    def _model(self, info, dp_parameters):
        """The preset model for the dataset, with the chosen input radius."""
        defaults = presets.training_defaults(info)
        scaled = datasets.DatasetInfo(**{**info.__dict__, "input_radius": self.controls["radius"].value})
        clip = self.controls["loss_clip"].value or None
        model = presets.build_model(defaults.model, scaled, dp_parameters, loss_gradient_clip=clip)
        return model, presets.make_loss("tau-cce", scaled, defaults.logit_scale)

    def readout(self) -> dict:
        """sigma, epsilon, q, steps, expected batch size and noise std per variable for the
        current controls, computed without training."""
        v = self.values
        info = self._info()
        q = expected_batch_size_to_rate(v["batch_size"], info.num_train)
        steps = v["epochs"] * steps_per_epoch(info.num_train, v["batch_size"])
        if v["budget_by"] == "epsilon":
            sigma = accounting.calibrate_noise_multiplier(round(v["epsilon"], 4), q, steps, v["delta"])
        else:
            sigma = v["sigma"]
        epsilon = accounting.compute_epsilon(sigma, q, steps, v["delta"])
        model, loss = self._model(info, None)
        bounds = relabel(model, gradient_bounds(model, loss))
        stds = dict(zip(bounds, noise_stddevs(list(bounds.values()), sigma, "global")))
        return {"noise_multiplier": sigma, "epsilon": epsilon, "sampling_rate": q, "steps": steps,
                "expected_batch_size": v["batch_size"], "noise_stddevs": stds, "bounds": bounds}

    def _refresh(self) -> None:
        start = time.perf_counter()
        try:
            r = self.readout()
        except ValueError as error:
            self.readout_html.value = f"<b style='color:crimson'>{error}</b>"
            return
        rows = "".join(
            f"<tr><td>{name}</td><td>{r['bounds'][name]:.3g}</td><td>{std:.3g}</td></tr>"
            for name, std in r["noise_stddevs"].items()
        )
        self.readout_html.value = (
            f"<b>σ = {r['noise_multiplier']:.3f}</b> &nbsp; ε = {r['epsilon']:.3f} &nbsp; δ = {self.values['delta']:.0e}<br>"
            f"q = {r['sampling_rate']:.4f} (expected batch {r['expected_batch_size']}), {r['steps']} steps<br>"
            f"<table><tr><th>variable</th><th>bound Δ</th><th>noise std σC</th></tr>{rows}</table>"
            f"<small>readout in {1000 * (time.perf_counter() - start):.0f} ms</small>"
        )

    # -------------------------------------------------------------------- training
    def start(self) -> None:
        """Train in a background thread (the Train button): the Stop button stays live."""
        if self._thread and self._thread.is_alive():
            return
        self.stop_requested = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the running training to stop after its current step."""
        self.stop_requested = True

    def wait(self) -> dict | None:
        """Block until a run started with :meth:`start` ends; return its results."""
        if self._thread:
            self._thread.join()
        return self.results

    def train(self) -> dict:
        """Train with the current controls, blocking; returns the results (also ``self.results``)."""
        self.stop_requested = False
        return self._run()

    def _run(self) -> dict:
        self.train_button.disabled, self.stop_button.disabled = True, False
        try:
            self.results = self._train()
            r = self.results
            self.status.value = (f"Test accuracy <b>{r['test_accuracy']:.3f}</b> at ε = {r['epsilon']:.3f} "
                                 f"after {r['steps']} steps ({r['seconds']:.1f} s).")
            return r
        finally:
            self.train_button.disabled, self.stop_button.disabled = False, True

    def _train(self) -> dict:
        v = self.values
        (x, y), (x_test, y_test), info = self._data(v["dataset"])
        r = self.readout()
        model, loss = self._model(info, DPParameters(r["noise_multiplier"], v["delta"]))
        model.compile(tf.keras.optimizers.Adam(v["learning_rate"]), loss=loss, metrics=["accuracy"])
        monitor = np.random.default_rng(0).choice(len(x_test), min(MONITOR_EXAMPLES, len(x_test)), replace=False)
        self._budget = (accounting.epsilon_curve(r["noise_multiplier"], r["sampling_rate"], r["steps"], v["delta"]),
                        r["epsilon"])
        live = LivePlots(self, x_test[monitor], y_test[monitor])
        self.status.value = "Training…"
        start = time.perf_counter()
        # The readout's epsilon is that of exactly the planned steps; the ledger counts them.
        model.fit(x, y, batch_size=v["batch_size"], epochs=v["epochs"], validation_data=(x_test, y_test),
                  callbacks=[live], verbose=0)
        seconds = time.perf_counter() - start
        statement = model.privacy_statement()
        return {"test_accuracy": live.history["val_accuracy"][-1], "epsilon": statement.epsilon,
                "steps": statement.steps, "seconds": seconds, "history": live.history, "model": model}

    def show_training(self, model, history: dict, norms: dict) -> None:
        """Redraw the three live plots (called by :class:`LivePlots` after each epoch)."""
        curve, budget = self._budget
        figures = {
            "accuracy": plots.accuracy(history),
            "gradients": plots.gradient_norms(relabel(model, norms), relabel(model, gradient_bounds(model))),
            "budget": plots.privacy_budget(curve, budget=budget, steps_taken=model.privacy_ledger.steps),
        }
        for name, figure in figures.items():
            self.images[name].value = figure_png(figure)
