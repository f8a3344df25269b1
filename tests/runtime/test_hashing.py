"""The splitmix64 hash that Dropout and augmentation share: the reference values, and the scalar
and array forms agree."""

from __future__ import annotations

import numpy as np

from dptrain.runtime.hashing import GAMMA, MASK64, chain, counters, mix, mix_inplace


def test_hash_is_splitmix64():
    # the first outputs of splitmix64 seeded with 0 (the reference implementation's values)
    h = counters(2)
    mix_inplace(h, np.empty_like(h))
    assert [int(v) for v in h] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


def test_scalar_and_array_forms_agree():
    values = [0, 1, GAMMA, MASK64, 0x123456789ABCDEF0]
    h = np.array(values, dtype=np.uint64)
    mix_inplace(h, np.empty_like(h))
    assert [int(v) for v in h] == [mix(v) for v in values]
    assert [int(c) for c in counters(3)] == [(j + 1) * GAMMA & MASK64 for j in range(3)]


def test_chain_is_mix_of_each_word_in_turn():
    assert chain(7) == 7
    assert chain(7, 1, 2) == mix(mix(7 ^ 1) ^ 2)
    assert chain(7, -1) == mix(7 ^ MASK64)  # words modulo 2**64
