"""Membership-inference audits: test the privacy guarantee empirically.

The game. A fair coin per example of a pool decides whether it trains the model (the
*members*, about half) or is held out (the *non-members*). The coins are independent, so for
each example the two worlds, with and without it, differ in that one example: exactly the
add-or-remove neighbours lipdp's accountant covers. (A split into two exact halves would
swap one example for another instead, which only 2 epsilon bounds, by group privacy.)
An attack scores every example; calling "member" above a threshold gives a true-positive
rate (TPR, on members) and a false-positive rate (FPR, on non-members). (epsilon, delta)-DP
caps every such test (Kairouz et al. 2015), for each example and so for their average:

    TPR <= e^eps FPR + delta   and   1 - FPR <= e^eps (1 - TPR) + delta,

so a measured (TPR, FPR) implies the **empirical epsilon lower bound**

    eps >= max( log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR)) ).

Attacks:

* ``loss``: the loss-threshold attack (Yeom et al. 2018), score = -loss of the example.
* ``lira``: the likelihood-ratio attack (Carlini et al. 2022) with shadow models trained
  on complementary subsets of the pool (each example is in exactly half of them, at least
  2), on the logit margin m = z_y - max_{j != y} z_j, with variances pooled over examples.

Statistics. AUC with a Hanley-McNeil 95 % interval. At each target FPR (1 % and 0.1 %)
the threshold is the one with the highest TPR whose FPR does not exceed it. The epsilon
lower bound at a point uses one-sided Clopper-Pearson bounds (a lower bound on TPR, an
upper bound on FPR) at level alpha / (2 k) each for k points (Bonferroni), so all the
bounds hold together with confidence 1 - alpha, and the reported bound is their maximum.
The intervals treat examples as independent trials; one trained model's examples are not
quite independent, so read them as indicative (Steinke, Nasr & Jagielski 2023 make one-run
audits rigorous).

What an audit can and cannot say: it gives a *lower* bound on epsilon for this attack.
A small empirical epsilon does not prove privacy (the loss attack on one model is weak);
only the accountant's epsilon is a guarantee, and a sound implementation never lets an
audit's lower bound exceed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import tensorflow as tf
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from lipdp import accounting, presets
from lipdp.certify import logit_margins, predict_logits
from lipdp.datasets import DatasetInfo
from lipdp.model import DPParameters
from lipdp.sampling import expected_batch_size_to_rate, steps_per_epoch

TARGET_FPRS = (0.01, 0.001)
ATTACKS = ("loss", "lira")
Trainer = Callable[[np.ndarray, np.ndarray], tf.keras.Model]


# ------------------------------------------------------------------ the DP trade-off
def dp_tpr_bound(fpr, epsilon: float, delta: float) -> np.ndarray:
    """The highest TPR any test can reach at this FPR against an (epsilon, delta)-DP model:
    min(e^eps FPR + delta, 1 - e^-eps (1 - FPR - delta)), clipped to [0, 1]."""
    fpr = np.asarray(fpr, dtype=np.float64)
    bound = np.minimum(math.exp(epsilon) * fpr + delta, 1 - math.exp(-epsilon) * (1 - fpr - delta))
    return np.clip(bound, 0.0, 1.0)


def dp_auc_bound(epsilon: float, delta: float) -> float:
    """The largest AUC an (epsilon, delta)-DP model allows: the area under
    :func:`dp_tpr_bound` (e^eps / (1 + e^eps) when delta = 0; 0.731 at eps = 1)."""
    tpr = dp_tpr_bound(np.linspace(0.0, 1.0, 200_001), epsilon, delta)  # piecewise linear: the
    return float(np.mean((tpr[1:] + tpr[:-1]) / 2))  # trapezoid rule on this grid is near exact


def empirical_epsilon(tpr: float, fpr: float, delta: float) -> float:
    """max(0, log((TPR - delta) / FPR), log((1 - FPR - delta) / (1 - TPR))): the smallest
    epsilon consistent with a test of these rates (inf when a ratio has a zero denominator)."""
    _check_rate("tpr", tpr)
    _check_rate("fpr", fpr)
    accounting.check_delta(delta)
    return max(0.0, _log_ratio(tpr - delta, fpr), _log_ratio(1 - fpr - delta, 1 - tpr))


def _log_ratio(numerator: float, denominator: float) -> float:
    if numerator <= 0:
        return 0.0
    return math.inf if denominator <= 0 else math.log(numerator / denominator)


def _check_rate(name: str, rate: float) -> None:
    if not (0.0 <= rate <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {rate!r}.")


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds: (lower, upper), each holding with probability
    1 - alpha for ``successes`` of ``trials`` Bernoulli trials."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"Need 0 <= successes <= trials and trials > 0, got {successes} of {trials}.")
    lower = 0.0 if successes == 0 else float(stats.beta.ppf(alpha, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(stats.beta.ppf(1 - alpha, successes + 1, trials - successes))
    return lower, upper


def auc_interval(auc: float, positives: int, negatives: int, confidence: float = 0.95) -> tuple[float, float]:
    """Hanley & McNeil (1982) normal interval for an AUC from this many positives/negatives."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2))
    half_width = stats.norm.ppf(0.5 + confidence / 2) * math.sqrt(max(variance, 0.0) / (positives * negatives))
    return float(max(0.0, auc - half_width)), float(min(1.0, auc + half_width))


# ----------------------------------------------------------------------- the report
@dataclass(frozen=True)
class OperatingPoint:
    """The attack at the threshold with the highest TPR whose FPR <= target_fpr."""

    target_fpr: float
    threshold: float
    tpr: float
    fpr: float
    epsilon: float  # point estimate from (tpr, fpr); inf when fpr = 0 < tpr - delta
    epsilon_lower: float  # Clopper-Pearson lower bound (simultaneous over the points)


@dataclass(frozen=True)
class MembershipAudit:
    """An attack's ROC on members vs non-members and what it implies for epsilon."""

    attack: str
    auc: float
    auc_interval: tuple[float, float]
    points: tuple[OperatingPoint, ...]
    delta: float
    confidence: float
    members: int
    non_members: int
    fpr: np.ndarray = field(repr=False)
    tpr: np.ndarray = field(repr=False)
    accounted_epsilon: float | None = None  # the guarantee of the audited model (None: none)

    @property
    def best_point(self) -> OperatingPoint:
        return max(self.points, key=lambda point: point.epsilon_lower)

    @property
    def epsilon_lower_bound(self) -> float:
        """The largest lower bound over the points: holds with the audit's confidence."""
        return self.best_point.epsilon_lower

    def as_dict(self) -> dict:
        """JSON-ready numbers: ``tpr_at_fpr_1pct`` etc. per point (infinite values become None)."""
        finite = lambda value: value if math.isfinite(value) else None  # noqa: E731
        return {
            "attack": self.attack, "auc": self.auc, "auc_ci95": list(self.auc_interval),
            "dp_auc_bound": None if self.accounted_epsilon is None else dp_auc_bound(self.accounted_epsilon, self.delta),
            **{f"tpr_at_fpr_{100 * point.target_fpr:g}pct": point.tpr for point in self.points},
            "empirical_epsilon": finite(self.best_point.epsilon),
            "empirical_epsilon_lower_bound": self.epsilon_lower_bound, "confidence": self.confidence,
            "delta": self.delta, "members": self.members, "non_members": self.non_members,
            "points": [{key: finite(value) for key, value in point.__dict__.items()} for point in self.points],
        }


def audit_scores(
    scores: np.ndarray, members: np.ndarray, delta: float = 1e-5, attack: str = "scores",
    target_fprs: tuple[float, ...] = TARGET_FPRS, confidence: float = 0.95,
    accounted_epsilon: float | None = None,
) -> MembershipAudit:
    """Audit membership scores (higher = "more likely a member") against the truth."""
    scores, members = _check_scores(scores, members)
    accounting.check_delta(delta)
    for target in target_fprs:
        if not 0 < target < 1:
            raise ValueError(f"Target FPRs must lie strictly between 0 and 1, got {target!r}.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence!r}.")
    fpr, tpr, thresholds = roc_curve(members, scores, drop_intermediate=False)
    positives, negatives = int(members.sum()), int((~members).sum())
    auc = float(roc_auc_score(members, scores))
    alpha = (1 - confidence) / (2 * len(target_fprs))  # Bonferroni: two rates per point
    points = tuple(
        _operating_point(target, fpr, tpr, thresholds, positives, negatives, delta, alpha) for target in target_fprs
    )
    return MembershipAudit(attack, auc, auc_interval(auc, positives, negatives, confidence), points, delta,
                           confidence, positives, negatives, fpr, tpr, accounted_epsilon)


def _operating_point(target, fpr, tpr, thresholds, positives, negatives, delta, alpha) -> OperatingPoint:
    """Highest TPR with FPR <= target (ROC rates are sorted), and its smallest FPR."""
    best_tpr = tpr[fpr <= target].max()
    index = int(np.argmax(tpr >= best_tpr))
    true_positives, false_positives = round(tpr[index] * positives), round(fpr[index] * negatives)
    tpr_lower, _ = clopper_pearson(true_positives, positives, alpha)
    _, fpr_upper = clopper_pearson(false_positives, negatives, alpha)
    return OperatingPoint(
        target, float(thresholds[index]), float(tpr[index]), float(fpr[index]),
        empirical_epsilon(float(tpr[index]), float(fpr[index]), delta),
        empirical_epsilon(tpr_lower, fpr_upper, delta),
    )


def _check_scores(scores, members) -> tuple[np.ndarray, np.ndarray]:
    scores, members = np.asarray(scores, dtype=np.float64), np.asarray(members)
    if scores.ndim != 1 or scores.shape != members.shape:
        raise ValueError(f"scores and members must be 1-D arrays of the same length, got shapes "
                         f"{scores.shape} and {members.shape}.")
    if members.dtype != bool:
        raise ValueError("members must be a boolean array (True: the example trained the model).")
    if members.all() or not members.any():
        raise ValueError("The audit needs both members and non-members: the membership mask is all "
                         f"{bool(members[0]) if len(members) else 'empty'}.")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values: check the model's outputs.")
    return scores, members


# --------------------------------------------------------------------------- attacks
def membership_split(num_examples: int, rng: np.random.Generator) -> np.ndarray:
    """Members by independent fair coins, one per example (about N / 2 of them): each
    example's in and out worlds are add-or-remove neighbours. Redrawn in the (probability
    2^(1-N)) case that all coins agree, since the audit needs both kinds."""
    if num_examples < 2:
        raise ValueError(f"A membership split needs at least 2 examples, got {num_examples}.")
    while True:
        members = rng.random(num_examples) < 0.5
        if members.any() and not members.all():
            return members


def loss_scores(model: tf.keras.Model, x: np.ndarray, y: np.ndarray, loss=None) -> np.ndarray:
    """-l(f(x), y) per example with the model's compiled loss (or ``loss``): members tend
    to have lower losses."""
    loss = loss or model.loss
    if not isinstance(loss, tf.keras.losses.Loss):
        raise TypeError(f"loss_scores needs a tf.keras Loss object (compile the model with one), got {loss!r}.")
    per_example = loss.call(tf.convert_to_tensor(y), predict_logits(model, x))  # call(): unreduced
    return -np.asarray(per_example, dtype=np.float64).reshape(len(x))


def margin_scores(model: tf.keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The logit margin z_y - max_{j != y} z_j per example (LiRA's statistic)."""
    return logit_margins(predict_logits(model, x), y).numpy().astype(np.float64)


def lira_scores(target: np.ndarray, shadow: np.ndarray, shadow_members: np.ndarray) -> np.ndarray:
    """Online LiRA: log N(phi_i; mu_in_i, s_in^2) - log N(phi_i; mu_out_i, s_out^2).

    ``target``: phi_i of the audited model (shape (N,)); ``shadow``: phi of each shadow model
    (shape (K, N)); ``shadow_members[k, i]``: whether shadow k trained on example i. mu_in_i
    and mu_out_i average the n_in_i / n_out_i shadows that did / did not train on i; s_in^2
    pools the squared deviations over all examples, divided by its degrees of freedom
    sum_i (n_in_i - 1) (s_out likewise): Carlini et al.'s fixed variance, robust with few
    shadows. Each example needs at least 2 shadows in and 2 out, or a deviation is 0 by
    construction.
    """
    target, shadow, inside = np.asarray(target, np.float64), np.asarray(shadow, np.float64), np.asarray(shadow_members)
    if shadow.ndim != 2 or shadow.shape != inside.shape or shadow.shape[1] != len(target):
        raise ValueError(f"Need shadow scores and membership of shape (K, N) with N = {len(target)}, "
                         f"got {shadow.shape} and {inside.shape}.")
    if inside.dtype != bool or min(inside.sum(axis=0).min(), (~inside).sum(axis=0).min()) < 2:
        raise ValueError("Every example must be in at least 2 shadow models and out of at least 2 (a "
                         "variance needs two samples): train 4 or more shadow models in complementary "
                         "pairs (see complementary_splits).")
    log_likelihoods = []
    for mask in (inside, ~inside):
        counts = mask.sum(axis=0)
        mean = (shadow * mask).sum(axis=0) / counts
        std = math.sqrt((((shadow - mean) ** 2) * mask).sum() / (counts - 1).sum())
        log_likelihoods.append(stats.norm.logpdf(target, mean, max(std, 1e-12)))
    return log_likelihoods[0] - log_likelihoods[1]


def complementary_splits(num_examples: int, shadow_models: int, rng: np.random.Generator) -> np.ndarray:
    """(K, N) membership of K shadow models: pairs of complementary random subsets
    (:func:`membership_split`), so each example trains exactly half of them."""
    if shadow_models < 4 or shadow_models % 2:
        raise ValueError(f"LiRA needs an even number (>= 4) of shadow models, got {shadow_models}: each "
                         "example must be in 2 of them and out of 2.")
    halves = [membership_split(num_examples, rng) for _ in range(shadow_models // 2)]
    return np.array([mask for half in halves for mask in (half, ~half)])


# -------------------------------------------------------------------- whole audits
@dataclass
class AuditRun:
    """A model trained on the members (a random subset of the pool), and the attacks' audits."""

    model: tf.keras.Model
    members: np.ndarray
    audits: dict[str, MembershipAudit]


def audit_training(
    train: Trainer, x: np.ndarray, y: np.ndarray, shadow_models: int = 0, delta: float = 1e-5,
    seed: int | None = None,
) -> AuditRun:
    """Train ``train(x_members, y_members)`` on the members of (x, y) (:func:`membership_split`),
    audit it with the loss attack and, with ``shadow_models`` > 0 (even, >= 4), LiRA (shadows
    come from the same ``train``, on splits independent of the members).

    ``seed`` fixes the audit's splits only (the auditor's coins, not the model's noise).
    """
    rng = np.random.default_rng(seed)
    members = membership_split(len(x), rng)
    model = train(x[members], y[members])
    accounted = model.privacy_statement().epsilon if getattr(model, "is_private", False) else None
    audit = lambda scores, attack: audit_scores(scores, members, delta, attack, accounted_epsilon=accounted)  # noqa: E731
    audits = {"loss": audit(loss_scores(model, x, y), "loss")}
    if shadow_models:
        inside = complementary_splits(len(x), shadow_models, rng)
        shadow = np.array([margin_scores(train(x[mask], y[mask]), x, y) for mask in inside])
        audits["lira"] = audit(lira_scores(margin_scores(model, x, y), shadow, inside), "lira")
    return AuditRun(model, members, audits)


def preset_trainer(
    info: DatasetInfo, epsilon: float | None, delta: float = 1e-5, epochs: int | None = None,
    batch_size: int | None = None, logit_scale: float | None = None,
) -> Trainer:
    """``train(x, y) -> model``: the dataset's default preset, tau cross-entropy and Adam,
    private at ``epsilon`` (sigma calibrated for len(x) examples: as everywhere in DP-SGD,
    the dataset size that sets the sampling rate is taken as public) or non-private (None).
    The expected batch size is capped at the number of examples."""
    defaults = presets.training_defaults(info)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value is not None and not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive integer (or None for the preset's), got {value!r}.")
    epochs = epochs or defaults.epochs
    if epsilon is not None:
        accounting.check_epsilon(epsilon)

    def train(x: np.ndarray, y: np.ndarray) -> tf.keras.Model:
        batch = min(batch_size or defaults.batch_size, len(x))
        sampling_rate = expected_batch_size_to_rate(batch, len(x))
        steps = epochs * steps_per_epoch(len(x), batch)
        parameters = None if epsilon is None else DPParameters(
            accounting.calibrate_noise_multiplier(epsilon, sampling_rate, steps, delta), delta)
        model = presets.build_model(defaults.model, info, parameters)
        loss = presets.make_loss("tau-cce", info, logit_scale or defaults.logit_scale)
        model.compile(tf.keras.optimizers.Adam(defaults.learning_rate), loss=loss, metrics=["accuracy"])
        model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0)
        return model

    return train
