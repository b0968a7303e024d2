"""Significance and uncertainty checked against scipy/statsmodels reference implementations."""

import numpy as np
import pytest
from scipy import stats as scipy_stats
from sklearn.metrics import accuracy_score, f1_score
from statsmodels.stats.contingency_tables import mcnemar

from ftloop.components.evaluation.metrics import INVALID, compute_metrics
from ftloop.components.evaluation.stats import bootstrap_ci, expected_calibration_error, mcnemar_exact, resampled_scores


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


def reference_resamples(y_true, y_pred, labels, seed, resamples):
    """Independent of stats.py: the same draws, each resample scored by sklearn.

    A None prediction becomes metrics.py's INVALID placeholder, which sklearn counts as wrong and in no column.
    """
    t = np.array(y_true)
    p = np.array([INVALID if x is None else x for x in y_pred])
    draws = np.random.default_rng(seed).integers(0, len(t), size=(resamples, len(t)))
    acc = [accuracy_score(t[d], p[d]) for d in draws]
    f1 = [f1_score(t[d], p[d], labels=labels, average="macro", zero_division=0) for d in draws]
    return acc, f1


def percentile_interval(values, confidence=0.95):
    """numpy's default (linear) quantiles at (1 - confidence) / 2 and 1 - (1 - confidence) / 2."""
    alpha = (1 - confidence) / 2
    return np.quantile(values, alpha), np.quantile(values, 1 - alpha)


def noisy_predictions(seed, n, labels, invalid=0.0):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(labels[:-1], n).tolist()  # the last label never occurs: an all-zero F1 column
    y_pred = [None if rng.random() < invalid else (t if rng.random() < 0.6 else str(rng.choice(labels))) for t in y_true]
    return y_true, y_pred


@pytest.mark.parametrize("seed, n, invalid", [(0, 40, 0.0), (1, 97, 0.0), (2, 60, 0.15), (3, 13, 0.3)])
def test_bootstrap_equals_sklearn_on_the_same_resamples(seed, n, invalid):
    labels = ["a", "b", "c", "d", "e"]
    y_true, y_pred = noisy_predictions(seed, n, labels, invalid)
    ours = bootstrap_ci(y_true, y_pred, labels, seed=seed + 10, resamples=400)
    acc, f1 = reference_resamples(y_true, y_pred, labels, seed=seed + 10, resamples=400)
    assert ours["accuracy"] == pytest.approx(percentile_interval(acc), abs=1e-12)
    assert ours["macro_f1"] == pytest.approx(percentile_interval(f1), abs=1e-12)
    # Sharp enough to catch a wrong level, the wrong seed or a percentile shifted by one order statistic:
    assert ours["macro_f1"][0] != pytest.approx(percentile_interval(f1, 0.90)[0])
    assert ours["macro_f1"][1] != pytest.approx(percentile_interval(f1, 0.90)[1])
    other_seed = percentile_interval(reference_resamples(y_true, y_pred, labels, seed=seed + 11, resamples=400)[1])
    assert ours["macro_f1"] != pytest.approx(other_seed)
    shifted = (np.quantile(f1, 0.025 + 1 / 399), np.quantile(f1, 0.975 - 1 / 399))
    assert ours["macro_f1"][0] != pytest.approx(shifted[0]) and ours["macro_f1"][1] != pytest.approx(shifted[1])


def test_bootstrap_confidence_level_is_used():
    labels = ["a", "b", "c"]
    y_true, y_pred = noisy_predictions(4, 80, labels)
    acc, f1 = reference_resamples(y_true, y_pred, labels, seed=0, resamples=300)
    for confidence in (0.5, 0.9, 0.99):
        ours = bootstrap_ci(y_true, y_pred, labels, seed=0, resamples=300, confidence=confidence)
        assert ours["accuracy"] == pytest.approx(percentile_interval(acc, confidence), abs=1e-12)
        assert ours["macro_f1"] == pytest.approx(percentile_interval(f1, confidence), abs=1e-12)


def test_bootstrap_agrees_with_scipy_percentile_intervals():
    """Sanity check against an implementation with its own resampling: equal up to Monte Carlo error."""
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    y_true = rng.choice(labels, 300).tolist()
    y_pred = [t if rng.random() < 0.7 else rng.choice(labels) for t in y_true]
    ours = bootstrap_ci(y_true, y_pred, labels, seed=1, resamples=4000)
    t, p = np.array(y_true), np.array(y_pred)
    idx = np.arange(len(t))
    ref_acc = scipy_stats.bootstrap(
        (idx,), lambda i: np.mean(t[i] == p[i]), method="percentile", n_resamples=4000, random_state=2, vectorized=False
    ).confidence_interval
    ref_f1 = scipy_stats.bootstrap(
        (idx,),
        lambda i: f1_score(t[i], p[i], labels=labels, average="macro", zero_division=0),
        method="percentile",
        n_resamples=1000,
        random_state=2,
        vectorized=False,
    ).confidence_interval
    assert ours["accuracy"][0] == pytest.approx(ref_acc.low, abs=0.015)
    assert ours["accuracy"][1] == pytest.approx(ref_acc.high, abs=0.015)
    assert ours["macro_f1"][0] == pytest.approx(ref_f1.low, abs=0.02)
    assert ours["macro_f1"][1] == pytest.approx(ref_f1.high, abs=0.02)


def test_resampled_scores_on_all_rows_equal_the_reported_metrics():
    """The bootstrap's statistic on the original rows is exactly metrics.py's accuracy and macro-F1, invalid outputs included."""
    labels = ["a", "b", "c", "d"]
    y_true, y_pred = noisy_predictions(8, 50, labels, invalid=0.2)
    assert None in y_pred and any(p is None and t == "a" for t, p in zip(y_true, y_pred))
    acc, f1 = resampled_scores(y_true, y_pred, labels, np.arange(50)[None, :])
    reported = compute_metrics(y_true, y_pred, labels)
    assert acc[0] == pytest.approx(reported["accuracy"], abs=1e-12)
    assert f1[0] == pytest.approx(reported["macro_f1"], abs=1e-12)
    # An invalid output is not silently some label: mapping None to "a" changes the scores.
    assert resampled_scores(y_true, ["a" if p is None else p for p in y_pred], labels, np.arange(50)[None, :]) != (acc, f1)


def test_bootstrap_rejects_labels_outside_the_label_set():
    with pytest.raises(ValueError, match=r"predictions not in the label set: \['z'\]"):
        bootstrap_ci(["a", "b"], ["a", "z"], ["a", "b"], seed=0)


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


def test_expected_calibration_error_over_several_bins():
    # 10 bins of width 0.1, each weighted by its share of the 7 rows:
    #   (0.0, 0.1]  0.05 wrong          accuracy 0,   confidence 0.05  gap 0.05  x 1 row  = 0.05
    #   (0.1, 0.2]  0.15 right, wrong   accuracy 0.5, confidence 0.15  gap 0.35  x 2 rows = 0.70
    #   (0.5, 0.6]  0.55 right          accuracy 1,   confidence 0.55  gap 0.45  x 1 row  = 0.45
    #   (0.6, 0.7]  0.65 wrong          accuracy 0,   confidence 0.65  gap 0.65  x 1 row  = 0.65
    #   (0.9, 1.0]  0.95 right, right   accuracy 1,   confidence 0.95  gap 0.05  x 2 rows = 0.10
    # ECE = (0.05 + 0.70 + 0.45 + 0.65 + 0.10) / 7 = 1.95 / 7 = 0.278571...
    # (the unweighted mean of the 5 gaps is 0.31; with 5 bins of width 0.2 it would be 1.85 / 7)
    confidences = [0.05, 0.15, 0.15, 0.55, 0.65, 0.95, 0.95]
    correct = [False, True, False, True, False, True, True]
    assert expected_calibration_error(confidences, correct) == pytest.approx(1.95 / 7, abs=1e-12)
    # bins=5: (0, 0.2] holds 0.05, 0.15, 0.15: accuracy 1/3, confidence 0.35/3, gap 0.65/3 x 3 rows = 0.65;
    # (0.4, 0.6] 0.45, (0.6, 0.8] 0.65, (0.8, 1.0] 0.10: (0.65 + 0.45 + 0.65 + 0.10) / 7 = 1.85 / 7
    assert expected_calibration_error(confidences, correct, bins=5) == pytest.approx(1.85 / 7, abs=1e-12)


def test_expected_calibration_error_weights_bins_by_rows():
    # 3 right at 0.9 (gap 0.1) and 1 wrong at 0.3 (gap 0.3): weighted (3 x 0.1 + 1 x 0.3) / 4 = 0.15,
    # where an unweighted mean over the two bins would give 0.2.
    assert expected_calibration_error([0.9, 0.9, 0.9, 0.3], [True, True, True, False]) == pytest.approx(0.15, abs=1e-12)


def test_expected_calibration_error_bins_are_closed_on_the_right():
    # 0.5 lies on the edge between (0.4, 0.5] and (0.5, 0.6]; it belongs to the lower bin, with 0.45:
    #   one bin, accuracy 0.5, confidence 0.475: ECE = |0.5 - 0.475| = 0.025.
    # Were 0.5 in the upper bin: (1 x 0.45 + 1 x 0.5) / 2 = 0.475.
    assert expected_calibration_error([0.5, 0.45], [True, False]) == pytest.approx(0.025, abs=1e-12)
    # The outer edges: 0.0 falls in the first bin with 0.1 (its upper edge), 1.0 in the last.
    #   (0.0, 0.1]: 0.0 wrong, 0.1 right: accuracy 0.5, confidence 0.05, gap 0.45 x 2 rows = 0.9
    #   (0.9, 1.0]: 1.0 right: gap 0 => ECE = 0.9 / 3 = 0.3
    assert expected_calibration_error([0.0, 0.1, 1.0], [False, True, True]) == pytest.approx(0.3, abs=1e-12)
