"""Character-level text data: windows read on demand, the contiguous split, the vocabulary, errors."""

from __future__ import annotations

import numpy as np
import pytest

from dptrain.data import Windows, decode, encode, load_text, split_text
from dptrain.errors import UserError

TEXT = "hello world, hello text.\n" * 8  # 200 characters


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_windows_are_the_next_characters_of_the_text(text_file):
    data = load_text(str(text_file), block_size=5, val_fraction=0.1)
    assert data.vocab == "".join(sorted(set(TEXT))) and data.n_classes == len(data.vocab)
    assert data.x.shape == data.y.shape == (len(TEXT) - 5, 5)
    x, y = data.take(np.array([0, 7, 194]))
    for row, start in enumerate((0, 7, 194)):
        assert decode(x[row], data.vocab) == TEXT[start:start + 5]
        assert decode(y[row], data.vocab) == TEXT[start + 1:start + 6]


def test_the_split_is_contiguous_and_no_window_crosses_it(text_file):
    data = load_text(str(text_file), block_size=5, val_fraction=0.1)
    train, val = split_text(data, 0.1)
    cut = 180  # floor(0.9 * 200)
    np.testing.assert_array_equal(train, np.arange(cut - 5))  # the last target of the last one: character 179
    np.testing.assert_array_equal(val, np.arange(cut, 195))
    assert train[-1] + 5 + 1 <= cut


def test_windows_stay_on_demand_through_the_dtype_and_subset(text_file):
    data = load_text(str(text_file), block_size=5, val_fraction=0.1)
    view = data.converted(np.float32).subset(np.arange(10, 20))
    assert isinstance(view.base_x, Windows) and view.reads_on_demand and view.vocab == data.vocab
    x, y = view.take(np.arange(3))
    assert x.dtype == np.float32 and y.dtype == np.uint8 and x.shape == (3, 5)
    assert decode(x[0].astype(int), data.vocab) == TEXT[10:15]


def test_encode_refuses_a_character_outside_the_vocabulary():
    np.testing.assert_array_equal(encode("abca", "abc"), [0, 1, 2, 0])
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        encode("az", "abc")


def test_a_text_too_short_or_not_utf8_is_a_one_line_error(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("abc", encoding="utf-8")
    with pytest.raises(UserError, match="short.txt: 3 characters leave 2 for training"):
        load_text(str(short), block_size=4, val_fraction=0.1)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ab\xff\xfe")
    with pytest.raises(UserError, match="bin.txt: not UTF-8"):
        load_text(str(binary), block_size=1, val_fraction=0.1)
    with pytest.raises(UserError, match="missing.txt: cannot read"):
        load_text(str(tmp_path / "missing.txt"), block_size=1, val_fraction=0.1)
