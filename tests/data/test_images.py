"""data.name = "images": class folders and path,label CSVs, their decoding, and the errors on bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from dptrain.data.images import ImageDecoder, cache_key, list_images
from dptrain.errors import UserError

from helpers import write_digit_images


def _decode_all(files, image_size=()):
    decoder = ImageDecoder(files, image_size)
    decoder.inspect(0, len(files))
    return decoder.decode(0, len(files))


def test_class_folders_give_sorted_classes_and_labels(tmp_path):
    root = write_digit_images(tmp_path / "train", per_class=3)
    (root / ".hidden").mkdir()  # e.g. .ipynb_checkpoints: not a class
    (root / "3" / ".DS_Store").write_bytes(b"x")  # hidden files are not images
    files = list_images(str(root))
    assert files.classes == tuple(str(d) for d in range(10))
    assert files.counts() == [3] * 10 and len(files) == 30
    assert all(p.startswith(f"{files.classes[label]}/") for p, label in zip(files.paths, files.labels))
    images = _decode_all(files)
    assert images.shape == (30, 1, 16, 16) and images.dtype == np.uint8
    expected = np.asarray(Image.open(root / files.paths[7]))
    np.testing.assert_array_equal(images[7, 0], expected)


def test_class_names_are_folder_names_in_sorted_order_and_subfolders_count(tmp_path):
    for name in ("zebra", "ant", "Mole"):
        (tmp_path / name / "deeper").mkdir(parents=True)
        Image.new("RGB", (4, 5), (10, 20, 30)).save(tmp_path / name / "a.png")
        Image.new("RGB", (4, 5), (40, 50, 60)).save(tmp_path / name / "deeper" / "b.jpg")
    files = list_images(str(tmp_path))
    assert files.classes == ("Mole", "ant", "zebra")
    assert files.paths[:2] == ("Mole/a.png", "Mole/deeper/b.jpg")
    images = _decode_all(files)
    assert images.shape == (6, 3, 5, 4)
    np.testing.assert_array_equal(images[0, :, 0, 0], [10, 20, 30])


def test_grey_and_colour_together_decode_as_rgb(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("L", (3, 3), 77).save(tmp_path / "a" / "grey.png")
    Image.new("RGBA", (3, 3), (1, 2, 3, 4)).save(tmp_path / "b" / "colour.png")
    images = _decode_all(list_images(str(tmp_path)))
    assert images.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(images[0, :, 1, 1], [77, 77, 77])
    np.testing.assert_array_equal(images[1, :, 1, 1], [1, 2, 3])  # alpha dropped


def test_image_size_resizes_and_without_it_the_first_odd_size_is_named(tmp_path):
    root = write_digit_images(tmp_path / "d", per_class=2)
    Image.new("L", (20, 12), 5).save(root / "4" / "wide.png")
    files = list_images(str(root))
    with pytest.raises(UserError, match=r"4/wide.png is 20x12 pixels .* set data.image_size"):
        _decode_all(files)
    assert _decode_all(files, (10, 9)).shape == (21, 1, 10, 9)


def test_a_csv_lists_paths_relative_to_it_with_names_or_numbers(tmp_path):
    root = write_digit_images(tmp_path / "imgs", per_class=2)
    rows = [(f"imgs/{p.parent.name}/{p.name}", p.parent.name) for p in sorted(root.rglob("*.png"))]
    (tmp_path / "numbers.csv").write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    files = list_images(str(tmp_path / "numbers.csv"))
    assert files.classes == tuple(str(d) for d in range(10)) and len(files) == 20
    assert [files.classes[y] for y in files.labels] == [y for _, y in rows]
    names = ["cat" if int(y) % 2 else "dog" for _, y in rows]
    (tmp_path / "names.csv").write_text("".join(f"{p},{n}\n" for (p, _), n in zip(rows, names)))  # no header
    files = list_images(str(tmp_path / "names.csv"))
    assert files.classes == ("cat", "dog") and [files.classes[y] for y in files.labels] == names


def test_validation_classes_follow_the_training_ones(tmp_path):
    train = list_images(str(write_digit_images(tmp_path / "train", per_class=2)))
    val_root = write_digit_images(tmp_path / "val", per_class=1, first=500)
    for d in range(5, 10):  # a validation set may lack classes
        for f in (val_root / str(d)).iterdir():
            f.unlink()
        (val_root / str(d)).rmdir()
    val = list_images(str(val_root), classes=train.classes)
    assert val.classes == train.classes and val.labels.tolist() == [0, 1, 2, 3, 4]
    (val_root / "cat").mkdir()
    Image.new("L", (16, 16)).save(val_root / "cat" / "x.png")
    with pytest.raises(UserError, match="class folder 'cat' is not one of the training classes"):
        list_images(str(val_root), classes=train.classes)


@pytest.mark.parametrize("make, message", [
    (lambda root: (root / "7" / "notes.txt").write_text("hello"), r"data folder .*: 7/notes.txt is not an image"),
    (lambda root: (root / "7" / "cut.png").write_bytes((root / "7").joinpath(sorted(os.listdir(root / "7"))[0])
                                                       .read_bytes()[:60]), r"7/cut.png: cannot be decoded"),
])
def test_a_file_that_is_not_an_image_is_named(tmp_path, make, message):
    root = write_digit_images(tmp_path / "d", per_class=2)
    make(root)
    with pytest.raises(UserError, match=message):
        _decode_all(list_images(str(root)))


def test_empty_and_missing_folders_are_one_line_errors(tmp_path):
    root = write_digit_images(tmp_path / "d", per_class=1)
    (root / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder 'empty' holds no images"):
        list_images(str(root))
    with pytest.raises(UserError, match=r"no class subfolders"):
        list_images(str(root / "3"))
    with pytest.raises(UserError, match=r"not found"):
        list_images(str(tmp_path / "nowhere"))


def test_a_csv_row_whose_image_is_missing_is_named_by_line(tmp_path):
    write_digit_images(tmp_path / "imgs", per_class=1)
    first = sorted((tmp_path / "imgs" / "0").iterdir())[0].name
    (tmp_path / "list.csv").write_text(f"path,label\nimgs/0/{first},0\nimgs/0/gone.png,0\n")
    with pytest.raises(UserError, match=r"list.csv: line 3: image imgs/0/gone.png not found"):
        list_images(str(tmp_path / "list.csv"))
    (tmp_path / "short.csv").write_text(f"imgs/0/{first}\n")
    with pytest.raises(UserError, match=r"short.csv: line 1: expected path,label"):
        list_images(str(tmp_path / "short.csv"))


def test_the_cache_key_changes_with_any_file_or_setting(tmp_path):
    root = write_digit_images(tmp_path / "d", per_class=2)
    key = cache_key(list_images(str(root)), ())
    assert cache_key(list_images(str(root)), ()) == key
    assert cache_key(list_images(str(root)), (8, 8)) != key
    victim = sorted((root / "5").iterdir())[0]
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: same bytes, new mtime
    touched = cache_key(list_images(str(root)), ())
    assert touched != key
    Image.new("L", (16, 16)).save(root / "5" / "new.png")
    assert cache_key(list_images(str(root)), ()) not in (key, touched)
