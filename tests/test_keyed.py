"""Keyed randomness: a pointwise permutation and counter-based draws every rank computes alike."""

from __future__ import annotations

import numpy as np
import pytest

from gnaq_dist.keyed import KeyedPermutation, derive_key, splitmix64, uniform_below


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097])
def test_keyed_permutation_is_a_bijection_of_0_to_n(n):
    perm = KeyedPermutation(n, derive_key(5, 1))
    image = perm(np.arange(n))
    assert image.dtype == np.int64
    np.testing.assert_array_equal(np.sort(image), np.arange(n))
    # pointwise: any subset, in any order, maps as the whole does
    pick = np.random.default_rng(0).permutation(n)[: max(1, n // 3)]
    np.testing.assert_array_equal(perm(pick), image[pick])


def test_keyed_permutation_shuffles_and_depends_on_the_key():
    n = 10_000
    a = KeyedPermutation(n, derive_key(0, 1))(np.arange(n))
    b = KeyedPermutation(n, derive_key(0, 2))(np.arange(n))
    assert (a != b).mean() > 0.99
    # well mixed: consecutive positions land far apart, position and image are uncorrelated
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05
    assert np.median(np.abs(np.diff(a))) > n / 10
    # each half of the positions covers the range evenly (a shuffled batch is a fair sample)
    first = np.sort(a[: n // 2])
    assert abs(np.searchsorted(first, n // 2) - n // 4) < 0.05 * n
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 10000\)"):
        KeyedPermutation(n, 1)(np.array([n]))


def test_uniform_below_is_a_pure_function_of_key_and_counter_and_uniform():
    counters = np.arange(200_000)
    bound = np.full(counters.shape, 10)
    draws = uniform_below(derive_key(1, 2), counters, bound)
    assert draws.min() == 0 and draws.max() == 9
    freq = np.bincount(draws, minlength=10) / draws.size
    assert np.abs(freq - 0.1).max() < 0.005
    np.testing.assert_array_equal(uniform_below(derive_key(1, 2), counters[5:9], bound[5:9]), draws[5:9])
    assert (uniform_below(derive_key(1, 3), counters, bound) != draws).mean() > 0.85
    # a per-counter bound; a bound of one always gives 0
    np.testing.assert_array_equal(uniform_below(7, np.arange(5), np.ones(5, dtype=np.int64)), np.zeros(5))
    big = uniform_below(7, counters, np.full(counters.shape, 1_000_003))
    assert big.max() < 1_000_003 and big.max() > 990_000


def test_splitmix64_is_the_reference_mixer():
    # splitmix64's first output from state 0 (Vigna's reference implementation)
    assert int(splitmix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
