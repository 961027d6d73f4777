"""``python -m lipdp train``: real runs in a subprocess, argument errors in-process."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import dp_accounting
import numpy as np
import pytest

import lipdp  # noqa: F401
from lipdp import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_KEYS = {"test_accuracy", "epsilon", "delta", "noise_multiplier", "epochs", "steps", "seconds"}
DIGITS_TRAIN = 1438  # digits: 1,797 images, a fixed 80/20 split


def direct_pld_epsilon(sigma, q, steps, delta):
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    return dp_accounting.pld.PLDAccountant(relation).compose(event).get_epsilon(delta)


def run_cli(*args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "lipdp", *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def last_json_line(stdout: str) -> dict:
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    assert lines, "no output"
    return json.loads(lines[-1])


def write_mnist_like_npz(path, n_train=600, n_test=200, seed=0):
    """uint8 28x28 images: class k is a bright horizontal band at rows 2k+4, 2k+5, plus noise."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = rng.integers(0, 10, size=n)
        x = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):
            x[i, 2 * k + 4 : 2 * k + 6, 4:24] = 255
        return x, y.astype(np.int64)

    x_train, y_train = make(n_train)
    x_test, y_test = make(n_test)
    y_train[:10] = np.arange(10)  # every class in the training set
    for i in range(10):
        x_train[i] = rng.integers(0, 60, size=(28, 28))
        x_train[i, 2 * i + 4 : 2 * i + 6, 4:24] = 255
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


# ---------------------------------------------------------------------- real runs
def test_train_digits_json():
    result = run_cli("train", "--json", "--epochs", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "warning: delta" not in result.stderr  # the default delta is below 1/N
    out = last_json_line(result.stdout)
    assert RESULT_KEYS <= set(out)
    assert out["epsilon"] <= cli.DEFAULT_EPSILON
    assert out["epsilon"] >= 0.99 * cli.DEFAULT_EPSILON  # calibrated, not wasted
    assert out["test_accuracy"] > 0.5
    assert out["delta"] == 1e-5
    assert out["epochs"] == 5
    steps_per_epoch = round(DIGITS_TRAIN / out["expected_batch_size"])
    assert out["steps"] == 5 * steps_per_epoch
    q = out["expected_batch_size"] / DIGITS_TRAIN
    assert out["sampling_rate"] == pytest.approx(q, rel=1e-12)
    # the reported epsilon is the accountant's for the reported sigma, q, steps
    assert out["epsilon"] == pytest.approx(
        direct_pld_epsilon(out["noise_multiplier"], q, out["steps"], out["delta"]), rel=1e-6
    )
    assert out["seconds"] > 0
    # the human summary is printed before the JSON line
    assert "test accuracy" in result.stdout and "epsilon" in result.stdout


@pytest.mark.parametrize("mode", ["clipped", "non-private"])
def test_train_other_modes_json(mode):
    result = run_cli("train", "--json", "--epochs", "5", "--mode", mode)
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json_line(result.stdout)
    assert out["mode"] == mode and out["test_accuracy"] > 0.5 and out["steps"] == 5 * round(DIGITS_TRAIN / 512)
    if mode == "clipped":
        assert out["epsilon"] <= cli.DEFAULT_EPSILON and out["clip"] == 1.0
        assert out["epsilon"] == pytest.approx(
            direct_pld_epsilon(out["noise_multiplier"], out["sampling_rate"], out["steps"], out["delta"]), rel=1e-6)
    else:
        assert out["epsilon"] is None and "no privacy" in out["statement"]


def test_train_npz_json(tmp_path):
    path = write_mnist_like_npz(tmp_path / "bands.npz")
    result = run_cli("train", "--json", "--dataset", path, "--epochs", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    out = last_json_line(result.stdout)
    assert RESULT_KEYS <= set(out)
    assert out["epsilon"] <= cli.DEFAULT_EPSILON
    assert out["epochs"] == 2
    q = out["expected_batch_size"] / 600
    assert out["steps"] == 2 * round(600 / out["expected_batch_size"])
    assert out["epsilon"] == pytest.approx(
        direct_pld_epsilon(out["noise_multiplier"], q, out["steps"], out["delta"]), rel=1e-6
    )
    assert 0.0 <= out["test_accuracy"] <= 1.0
    assert out["dataset"] == "bands.npz"


def test_error_exit_code_through_python_m():
    result = run_cli("train", "--epsilon", "0", timeout=120)
    assert result.returncode == 2
    assert "lipdp: error:" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == ""


# ------------------------------------------------------------- errors, in-process
def _error_cases(tmp_path):
    partial = tmp_path / "partial.npz"
    np.savez(partial, x_train=np.zeros((5, 28, 28), np.uint8), y_train=np.zeros(5, np.int64))
    return {
        "epsilon 0": ["--epsilon", "0"],
        "epsilon -1": ["--epsilon", "-1"],
        "epsilon nan": ["--epsilon", "nan"],
        "delta 0": ["--delta", "0"],
        "delta 1.5": ["--delta", "1.5"],
        "noise 0": ["--noise-multiplier", "0"],
        "noise -2": ["--noise-multiplier", "-2"],
        "batch > N": ["--batch-size", "5000"],
        "batch 0": ["--batch-size", "0"],
        "epochs 0": ["--epochs", "0"],
        "lr -1": ["--lr", "-1"],
        "unknown dataset": ["--dataset", "no-such-dataset"],
        "npz missing arrays": ["--dataset", str(partial)],
        "clip 0": ["--mode", "clipped", "--clip", "0"],
        "non-private with epsilon": ["--mode", "non-private", "--epsilon", "3"],
    }


@pytest.mark.parametrize(
    "case",
    ["epsilon 0", "epsilon -1", "epsilon nan", "delta 0", "delta 1.5", "noise 0", "noise -2", "batch > N",
     "batch 0", "epochs 0", "lr -1", "unknown dataset", "npz missing arrays", "clip 0", "non-private with epsilon"],
)
def test_bad_arguments_exit_2_with_a_message(case, tmp_path, capsys):
    argv = ["train", *_error_cases(tmp_path)[case]]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("lipdp: error:"), err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert out == ""


def test_corrupt_npz_exits_2(tmp_path, capsys):
    np.savez(tmp_path / "full.npz", x_train=np.zeros((5, 28, 28), np.uint8), y_train=np.zeros(5, np.int64),
             x_test=np.zeros((5, 28, 28), np.uint8), y_test=np.zeros(5, np.int64))
    data = (tmp_path / "full.npz").read_bytes()
    (tmp_path / "broken.npz").write_bytes(data[: len(data) // 2])
    assert cli.main(["train", "--dataset", str(tmp_path / "broken.npz")]) == 2
    assert capsys.readouterr().err.startswith("lipdp: error:")


def test_npz_missing_arrays_message_names_them(tmp_path, capsys):
    assert cli.main(["train", *_error_cases(tmp_path)["npz missing arrays"]]) == 2
    err = capsys.readouterr().err
    assert "x_test" in err and "y_test" in err


def test_batch_size_above_dataset_message_mentions_sampling_rate(capsys):
    assert cli.main(["train", "--batch-size", "5000"]) == 2
    assert "sampling rate" in capsys.readouterr().err


def test_epsilon_and_noise_multiplier_are_exclusive(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--epsilon", "3", "--noise-multiplier", "1.0"])
    assert info.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_missing_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2


def test_warning_when_delta_is_not_below_one_over_n(capsys):
    """A short noise-multiplier run (no calibration) with delta >= 1/N."""
    delta = 1e-3  # 1/N = 1/1438 ~ 6.95e-4
    assert delta >= 1 / DIGITS_TRAIN
    code = cli.main(["train", "--json", "--epochs", "1", "--noise-multiplier", "2.0", "--delta", str(delta)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "warning" in err and "1/N" in err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["delta"] == delta
    assert result["noise_multiplier"] == 2.0
    assert result["target_epsilon"] is None
    q = result["expected_batch_size"] / DIGITS_TRAIN
    assert result["steps"] == round(DIGITS_TRAIN / result["expected_batch_size"])
    assert result["epsilon"] == pytest.approx(direct_pld_epsilon(2.0, q, result["steps"], delta), rel=1e-6)


@pytest.mark.parametrize("n, expected", [(1438, 1e-5), (60000, 1e-5), (100000, 1e-6), (2_000_000, 1e-7)])
def test_default_delta_is_below_one_over_n(n, expected):
    delta = cli.default_delta(n)
    assert delta < 1 / n
    assert math.isclose(delta, expected, rel_tol=1e-9)


# -------------------------------------------------------------------------- audit
AUDIT_KEYS = {"auc", "auc_ci95", "tpr_at_fpr_1pct", "tpr_at_fpr_0.1pct", "empirical_epsilon_lower_bound",
              "epsilon", "non_member_accuracy", "attacks"}


def _check_audit_output(out: dict, shadow_models: int) -> None:
    assert out["dataset"] == "digits" and out["shadow_models"] == shadow_models
    assert out["primary_attack"] == ("lira" if shadow_models else "loss")
    assert out["non_private"]["epsilon"] is None and out["non_private"]["dp_auc_bound"] is None
    private = out["private"]
    assert private["epsilon"] <= cli.DEFAULT_AUDIT_EPSILON
    assert private["empirical_epsilon_lower_bound"] <= private["epsilon"]
    for model in ("non_private", "private"):
        assert AUDIT_KEYS <= set(out[model])
        assert set(out[model]["attacks"]) == ({"loss", "lira"} if shadow_models else {"loss"})
        assert out[model]["members"] + out[model]["non_members"] == out["pool"] == 1797


def test_audit_json_short_run():
    result = run_cli("audit", "--json", "--epochs", "3", "--shadow-models", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    _check_audit_output(last_json_line(result.stdout), 4)
    for line in result.stdout.splitlines()[:-1]:  # the summary table: labels never run into values
        assert not re.search(r"\)\d", line), line
    assert "lower* bound on epsilon" in result.stdout and "not private" in result.stdout


@pytest.mark.slow
def test_audit_json_defaults():
    result = run_cli("audit", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    out = last_json_line(result.stdout)
    _check_audit_output(out, cli.DEFAULT_SHADOW_MODELS)
    assert out["non_private"]["non_member_accuracy"] > 0.9
    assert out["private"]["auc_ci95"][0] <= out["private"]["dp_auc_bound"]


@pytest.mark.parametrize("argv, message", [
    (["--epsilon", "0"], "epsilon"),
    (["--delta", "2"], "delta"),
    (["--epochs", "0"], "--epochs"),
    (["--shadow-models", "3"], "even"),
    (["--shadow-models", "-2"], "even"),
    (["--shadow-models", "2"], ">= 4"),
    (["--dataset", "no-such-dataset"], "Unknown dataset"),
])
def test_audit_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    code = cli.main(["audit", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("lipdp: error:") and message in err and len(err.strip().splitlines()) == 1
