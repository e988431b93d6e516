"""pellucid.bench.stats.signed_rank_p equals scipy.stats.wilcoxon's p-value everywhere: on the
small samples with ties and zeros where it enumerates the sign flips itself, and on the others
where it hands over to scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as sps

from pellucid.bench.stats import SIGN_FLIP_LIMIT, signed_rank_p


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_signed_rank_p_equals_scipy_with_ties_and_zeros(alternative):
    rng = np.random.default_rng(0)
    checked = 0
    for n in range(1, SIGN_FLIP_LIMIT + 3):
        for _ in range(12 if n < 10 else 2):  # scipy's reference takes 0.6 s a sample at n = 13
            # few distinct values: ties and zeros in most samples; scores in [0, 1] differences
            d = rng.integers(-3, 4, size=n) / 4.0
            if not d.any():
                continue
            ours = signed_rank_p(d, alternative)
            ref = float(sps.wilcoxon(d, alternative=alternative).pvalue)
            assert ours == pytest.approx(ref, rel=1e-12, abs=1e-15), (d, ours, ref)
            checked += 1
    # and continuous differences (no ties: scipy's exact distribution), one of them tied on purpose
    for n in (5, 9, 13, 20):
        d = rng.normal(size=n)
        assert signed_rank_p(d, alternative) == sps.wilcoxon(d, alternative=alternative).pvalue
        d[1] = -d[0]
        assert signed_rank_p(d, alternative) == pytest.approx(
            float(sps.wilcoxon(d, alternative=alternative).pvalue), rel=1e-12)
    assert checked > 100


def test_signed_rank_p_by_hand():
    """d = (1, 1, -1): |d| ranks 2, 2, 2; R+ = 4; of the 8 sign flips R+* >= 4 in 4 (two or three
    positive), so P(greater) = 1/2; R+* <= 4 in 7 (all but all positive)."""
    d = np.array([1.0, 1.0, -1.0])
    assert signed_rank_p(d, "greater") == 0.5
    assert signed_rank_p(d, "less") == 7 / 8
    assert signed_rank_p(d) == 1.0
