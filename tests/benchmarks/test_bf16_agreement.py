"""The bfloat16 agreement benchmark's measures: tokens before the first difference, identity."""

from __future__ import annotations

from benchmarks.bf16_agreement import agreement, first_difference


def test_first_difference_and_agreement():
    assert first_difference([1, 2, 3], [1, 2, 3]) == 3
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([5], [6]) == 0
    a = agreement([[1, 2, 3], [1, 2, 3], [4, 4, 4]], [[1, 2, 3], [1, 2, 0], [0, 4, 4]])
    assert (a["identical"], a["first_difference"], a["first_difference_min"]) == (1, [3, 2, 0], 0)
    assert a["identical_share"] == 1 / 3 and a["first_difference_median_of_diverged"] == 1.0
    assert agreement([[1]], [[1]])["first_difference_median_of_diverged"] is None
