"""The headline every report opens with: did augmentation help on test, by how much, is it significant (or was it off,
``augment.rounds: 0``), and how the fine-tuned models compare with the baselines. Plain sentences from summary.json;
each renderer escapes them."""

from __future__ import annotations

from typing import Any

SIGNIFICANCE_LEVEL = 0.05  # McNemar's exact p below this is "significant"

NO_CHANGE = 0.005  # a test macro-F1 delta smaller than this (it rounds to 0.00) is "no change"

BASELINES = ("tfidf", "zero-shot")

DISPLAY = {"tfidf": "TF-IDF", "zero-shot": "zero-shot"}


def format_p(p: float) -> str:
    """Four decimals, or three significant digits below 0.001, so a tiny p-value never prints as 0.0000."""
    if p >= 0.001:
        return f"{p:.4f}"
    return f"{p:.2e}" if p > 0 else "<1e-300"  # 0.0 only when the exact p underflowed a float


def _score(value: float) -> str:
    return f"{value:.2f}"


def _signed(delta: float) -> str:
    """+0.03 / −0.02 (a real minus sign); three decimals when two would read 0.00."""
    digits = 3 if 0 < abs(delta) < NO_CHANGE else 2
    text = f"{abs(delta):.{digits}f}"
    return ("−" if delta < 0 else "+") + text


def _test_macro_f1(summary: dict[str, Any], name: str) -> float | None:
    try:
        return float(summary["models"][name]["test"]["macro_f1"])
    except (KeyError, TypeError, ValueError):
        return None


def _interval(summary: dict[str, Any], name: str) -> list[float] | None:
    ci = (summary["models"][name]["test"].get("ci95") or {}).get("macro_f1")
    return ci if ci and len(ci) == 2 else None


AUGMENTATION_OFF = (
    "Augmentation was off (augment.rounds: 0): the run fine-tuned the base model, evaluated it and compared it with the baselines."
)


def augmentation_off(summary: dict[str, Any]) -> bool:
    """The run's config says ``augment.rounds: 0`` and there is no augmented model: the loop never ran."""
    config = summary.get("config")
    augment = config.get("augment") if isinstance(config, dict) else None
    rounds = augment.get("rounds") if isinstance(augment, dict) else None
    return rounds == 0 and not isinstance(rounds, bool) and "augmented" not in (summary.get("models") or {})


def augmentation_sentence(summary: dict[str, Any]) -> str | None:
    """Did augmentation help on test? ``AUGMENTATION_OFF`` when it was off; None when the summary has no base and
    augmented model for another reason."""
    if augmentation_off(summary):
        return AUGMENTATION_OFF
    before, after = _test_macro_f1(summary, "base"), _test_macro_f1(summary, "augmented")
    if before is None or after is None:
        return None
    delta = after - before
    test = ((summary.get("significance") or {}).get("base->augmented") or {}).get("test") or {}
    p = test.get("p_value")
    significant = p is not None and p < SIGNIFICANCE_LEVEL
    if abs(delta) < NO_CHANGE:
        opening = "Augmentation made no difference on test"
    elif delta > 0:
        opening = "Augmentation helped on test" if significant else "Augmentation did not clearly help on test"
    else:
        opening = "Augmentation hurt on test" if significant else "Augmentation did not help on test"
    details = _signed(delta)
    if p is not None:
        details += f", McNemar p = {format_p(p)}, " + ("significant" if significant else "not significant")
    intervals = [_interval(summary, "base"), _interval(summary, "augmented")]
    if all(intervals):
        (b_lo, b_hi), (a_lo, a_hi) = intervals
        details += f"; 95% bootstrap intervals [{b_lo:.2f}, {b_hi:.2f}] → [{a_lo:.2f}, {a_hi:.2f}]"
    return f"{opening}: macro-F1 {_score(before)} → {_score(after)} ({details})."


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def baseline_sentence(summary: dict[str, Any]) -> str | None:
    """How the fine-tuned models compare with TF-IDF and zero-shot on test macro-F1."""
    tuned = [n for n in ("base", "augmented") if _test_macro_f1(summary, n) is not None]
    baselines = [n for n in BASELINES if _test_macro_f1(summary, n) is not None]
    if not tuned or not baselines:
        return None
    groups: dict[str, list[str]] = {}
    for b in baselines:
        score = _test_macro_f1(summary, b)
        beaten_by = [n for n in tuned if _test_macro_f1(summary, n) > score]
        key = "all" if len(beaten_by) == len(tuned) else "none" if not beaten_by else beaten_by[0]
        groups.setdefault(key, []).append(f"{DISPLAY.get(b, b)} ({_score(score)})")
    subject = "Both fine-tuned models" if len(tuned) == 2 else f"The fine-tuned {tuned[0]} model"
    parts = []
    if "all" in groups:
        parts.append(f"{subject} beat{'s' if len(tuned) == 1 else ''} {_names(groups['all'])}")
    for name in tuned:
        if name in groups:
            parts.append(f"only the {name} model beats {_names(groups[name])}")
    if "none" in groups:
        parts.append(
            f"{_names(groups['none'])} {'does' if len(groups['none']) == 1 else 'do'} at least as well as "
            + ("both fine-tuned models" if len(tuned) == 2 else f"the {tuned[0]} model")
        )
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."


def headline(summary: dict[str, Any]) -> list[str]:
    """One or two plain sentences (test macro-F1) for the top of every report; empty when there is nothing to say."""
    return [s for s in (augmentation_sentence(summary), baseline_sentence(summary)) if s]
