"""The Playground, driven without a browser."""

import pytest

from lipdp.widgets import Playground


@pytest.fixture(scope="module")
def playground():
    return Playground(epochs=2)


def test_moving_epsilon_changes_the_sigma_readout(playground):
    playground.set(epsilon=1.0)
    strict = playground.readout()["noise_multiplier"]
    assert f"{strict:.3f}" in playground.readout_html.value
    playground.set(epsilon=8.0)
    loose = playground.readout()["noise_multiplier"]
    assert loose < strict and f"{loose:.3f}" in playground.readout_html.value


def test_sigma_mode_reports_the_epsilon_it_costs(playground):
    playground.set(budget_by="sigma", sigma=2.0)
    readout = playground.readout()
    assert readout["noise_multiplier"] == 2.0 and readout["epsilon"] > 0
    playground.set(budget_by="epsilon")


def test_impossible_settings_show_an_error_instead_of_a_readout(playground):
    playground.set(epochs=1, batch_size=playground.controls["batch_size"].max)  # one full-batch step
    playground.set(epsilon=19.9)  # reached with sigma below the calibration floor
    assert "crimson" in playground.readout_html.value and "sigma" in playground.readout_html.value
    playground.set(epsilon=3.0, epochs=2, batch_size=64)
    assert "crimson" not in playground.readout_html.value


def test_a_short_run_fills_every_plot(playground):
    playground.set(epsilon=3.0, batch_size=256)
    results = playground.train()
    assert results["epsilon"] <= 3.0 and results["test_accuracy"] > 0.1
    assert all(len(image.value) > 1000 for image in playground.images.values())
    assert "Test accuracy" in playground.status.value


def test_stop_ends_a_background_run_early(playground):
    playground.set(epochs=30, batch_size=64)
    playground.start()
    playground.stop()
    results = playground.wait()
    assert results["steps"] < playground.readout()["steps"]
    assert not playground.train_button.disabled


def test_unknown_control_is_refused(playground):
    with pytest.raises(ValueError, match="Unknown control"):
        playground.set(temperature=3)


def test_controls_follow_a_newly_chosen_dataset(playground):
    info = playground._info()
    bigger = info.__class__(**{**info.__dict__, "num_train": 60000, "input_radius": 5.6, "name": "mnist"})
    playground.fit_controls_to(bigger)
    assert playground.controls["batch_size"].max == 60000 and playground.controls["radius"].value == 5.6
    playground.fit_controls_to(info)
    assert playground.controls["batch_size"].max == info.num_train
    assert playground.controls["radius"].value == info.input_radius


def test_the_loss_gradient_clip_lowers_the_noise_readout(playground):
    playground.set(loss_clip=0.0)
    full = list(playground.readout()["noise_stddevs"].values())
    playground.set(loss_clip=0.5)  # below the tau cross-entropy's L = sqrt(2)
    clipped = list(playground.readout()["noise_stddevs"].values())
    assert clipped == pytest.approx([s * 0.5 / 2 ** 0.5 for s in full], rel=1e-5)
    playground.set(loss_clip=0.0)
