"""Uncertainty and paired significance for per-record metrics.

Every rate the pipeline reports carries its n and a 95% confidence interval, and every comparison
of two models on the same records is paired (the same record answered by both):

    from fire_mpo_core.evaluation.stats import rate_with_ci, mcnemar, paired_bootstrap
    metrics |= rate_with_ci("grounded_accuracy", [True, False, True])
    # {"grounded_accuracy": 0.6667, "grounded_accuracy_n": 3,
    #  "grounded_accuracy_ci_low": 0.2077, "grounded_accuracy_ci_high": 0.9385}
    mcnemar(a_right, b_right)        # exact two-sided test on the discordant records
    paired_bootstrap(a_scores, b_scores)   # mean difference with a percentile CI and a p-value

Why these: the Wilson interval stays inside [0, 1] and keeps its coverage at the small n and the
rates near 0 or 1 that grounding metrics have (a normal interval does not); McNemar's exact test
is the standard paired test for two classifiers' right/wrong on the same items (scipy's binomial
test on the discordant counts); the paired bootstrap handles non-binary scores (F1, ROUGE).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

__all__ = ["mcnemar", "paired_bootstrap", "rate_with_ci", "wilson_ci"]


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """Wilson score interval of a binomial rate k / n (None, None for n = 0)."""
    if n == 0:
        return None, None
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def rate_with_ci(
    name: str, flags: Sequence[bool], digits: int = 4
) -> dict[str, float | int | None]:
    """``name`` (the rate), ``name_n``, ``name_ci_low``, ``name_ci_high`` for 0/1 outcomes."""
    n, k = len(flags), int(sum(bool(f) for f in flags))
    lo, hi = wilson_ci(k, n)
    r = lambda x: None if x is None else round(x, digits)  # noqa: E731
    return {
        name: r(k / n) if n else None,
        f"{name}_n": n,
        f"{name}_ci_low": r(lo),
        f"{name}_ci_high": r(hi),
    }


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float | int]:
    """Exact McNemar test of two paired right/wrong vectors (same records, same order).

    Returns ``a_only`` (a right, b wrong), ``b_only``, ``diff`` (accuracy of a minus b) and the
    two-sided ``p`` of a binomial test of ``a_only`` out of the discordant pairs at 1/2
    (p = 1 when there is no discordant pair)."""
    if len(a) != len(b):
        raise ValueError(f"paired vectors differ in length: {len(a)} vs {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    disc = a_only + b_only
    p = binomtest(a_only, disc, 0.5).pvalue if disc else 1.0
    n = len(a)
    return {
        "a_only": a_only,
        "b_only": b_only,
        "n": n,
        "diff": round((a_only - b_only) / n, 4) if n else 0.0,
        "p": float(p),
    }


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Mean of ``a - b`` over paired records with a 95% percentile bootstrap interval and a
    two-sided p-value (twice the smaller share of resampled means on either side of 0)."""
    if len(a) != len(b):
        raise ValueError(f"paired vectors differ in length: {len(a)} vs {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.size == 0:
        return {"diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0, "n": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    p = 2.0 * min((means <= 0).mean(), (means >= 0).mean())
    return {
        "diff": round(float(d.mean()), 4),
        "ci_low": round(float(np.quantile(means, 0.025)), 4),
        "ci_high": round(float(np.quantile(means, 0.975)), 4),
        "p": float(min(1.0, p)),
        "n": int(d.size),
    }
