"""Significance and uncertainty checked against scipy/statsmodels reference implementations."""

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import f1_score
from statsmodels.stats.contingency_tables import mcnemar

from ftloop.components.stats import bootstrap_ci, expected_calibration_error, mcnemar_exact


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_matches_statsmodels(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    before = rng.random(n) < rng.uniform(0.3, 0.9)
    after = np.where(rng.random(n) < 0.2, ~before, before)
    result = mcnemar_exact(before.tolist(), after.tolist())
    table = [[np.sum(before & after), np.sum(before & ~after)], [np.sum(~before & after), np.sum(~before & ~after)]]
    reference = mcnemar(table, exact=True)
    assert result["p_value"] == pytest.approx(reference.pvalue, rel=1e-12, abs=1e-15)
    assert result["fixed"] == table[1][0] and result["broken"] == table[0][1]


def test_mcnemar_no_discordant_pairs():
    assert mcnemar_exact([True, False], [True, False]) == {"fixed": 0, "broken": 0, "discordant": 0, "p_value": 1.0}


def test_bootstrap_matches_scipy_percentile_intervals():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    y_true = rng.choice(labels, 300).tolist()
    y_pred = [t if rng.random() < 0.7 else rng.choice(labels) for t in y_true]
    ours = bootstrap_ci(y_true, y_pred, labels, seed=1, resamples=4000)
    t, p = np.array(y_true), np.array(y_pred)
    idx = np.arange(len(t))
    ref_acc = scipy_stats.bootstrap((idx,), lambda i: np.mean(t[i] == p[i]), method="percentile",
                                    n_resamples=4000, random_state=2, vectorized=False).confidence_interval
    ref_f1 = scipy_stats.bootstrap((idx,), lambda i: f1_score(t[i], p[i], labels=labels, average="macro", zero_division=0),
                                   method="percentile", n_resamples=1000, random_state=2, vectorized=False).confidence_interval
    # Independent resampling: the intervals agree to Monte Carlo error.
    assert ours["accuracy"][0] == pytest.approx(ref_acc.low, abs=0.015)
    assert ours["accuracy"][1] == pytest.approx(ref_acc.high, abs=0.015)
    assert ours["macro_f1"][0] == pytest.approx(ref_f1.low, abs=0.02)
    assert ours["macro_f1"][1] == pytest.approx(ref_f1.high, abs=0.02)


def test_bootstrap_macro_f1_per_resample_equals_sklearn():
    # One "resample" that is the identity: the interval collapses onto sklearn's value.
    y_true = ["a", "b", "b", "c", "a"]
    y_pred = ["a", "b", "c", "c", "b"]
    ci = bootstrap_ci(y_true * 200, y_pred * 200, ["a", "b", "c", "d"], seed=0, resamples=200)
    expected = f1_score(y_true, y_pred, labels=["a", "b", "c", "d"], average="macro", zero_division=0)
    assert ci["macro_f1"][0] <= expected <= ci["macro_f1"][1]
    assert ci["macro_f1"][1] - ci["macro_f1"][0] < 0.1


def test_bootstrap_is_deterministic_for_a_seed():
    y = ["a", "b"] * 20
    p = ["a", "a"] * 20
    assert bootstrap_ci(y, p, ["a", "b"], seed=3) == bootstrap_ci(y, p, ["a", "b"], seed=3)


def test_expected_calibration_error():
    assert expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
