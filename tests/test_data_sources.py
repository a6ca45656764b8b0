"""load_splits on every supported layout, fabricated in tmp_path, and on the real data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import SHARED_DATA as REAL_DATA
from data_fixtures import (
    CARS_CLASSES,
    CUB_CLASSES,
    make_cars,
    make_class_folders,
    make_cub,
    make_flowers,
    make_imagefolder,
    make_sketch,
    write_image,
    write_list,
)
from torchvision.datasets import StanfordCars

from piggyback.data import FORMATS, detect_format, load_splits
from piggyback.data.sources import TEST_SPLIT_SEED
from piggyback.errors import DataError

THREE = {"cat": 10, "dog": 10, "owl": 5}


def counts(samples) -> dict[int, int]:
    return dict(Counter(label for _, label in samples))


def paths(samples) -> set[Path]:
    return {path for path, _ in samples}


# --- imagefolder --------------------------------------------------------------------------------


def test_imagefolder_with_official_val_and_test(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, THREE, val={"cat": 2, "owl": 1}, test={"dog": 3})
    splits = load_splits(tmp_path, "imagefolder")
    assert splits.class_names == ["cat", "dog", "owl"]
    assert (splits.source, splits.val_origin, splits.test_origin) == (
        "imagefolder",
        "official",
        "official",
    )
    assert counts(splits.train) == {0: 10, 1: 10, 2: 5}
    assert counts(splits.val) == {0: 2, 2: 1}  # a val without dogs keeps train's indices
    assert counts(splits.test) == {1: 3}
    assert all(path.parent.name == splits.class_names[label] for path, label in splits.train)


def test_imagefolder_without_val_holds_out_a_stratified_val(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, THREE)
    splits = load_splits(tmp_path, val_fraction=0.2)
    assert splits.val_origin == "holdout" and splits.test is None and splits.test_origin is None
    assert counts(splits.val) == {0: 2, 1: 2, 2: 1}
    assert counts(splits.train) == {0: 8, 1: 8, 2: 4}
    assert not paths(splits.train) & paths(splits.val)


def test_holdout_depends_on_the_seed_only(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, {"a": 30, "b": 30})
    first, again, other = (load_splits(tmp_path, seed=s) for s in (0, 0, 1))
    assert first.val == again.val and first.train == again.train
    assert paths(first.val) != paths(other.val)


def test_imagefolder_ignores_hidden_and_non_image_files(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, {"a": 2, "b": 2})
    write_image(tmp_path / "train" / ".ipynb_checkpoints" / "x.jpg")
    write_image(tmp_path / "train" / "a" / "._resource_fork.jpg")
    (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
    splits = load_splits(tmp_path)
    assert splits.class_names == ["a", "b"]
    assert len(splits.train) + len(splits.val) == 4


def test_val_class_missing_from_train_is_named(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, {"a": 2, "b": 2}, val={"a": 1, "zebra": 1})
    with pytest.raises(DataError, match=r"val/zebra.*not classes of the train split"):
        load_splits(tmp_path)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "train" / "empty_one").mkdir()
    with pytest.raises(DataError, match=r"without images.*train/empty_one"):
        load_splits(tmp_path)


def test_train_folder_without_class_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="holds no class folders"):
        load_splits(tmp_path, "imagefolder")


def test_imagefolder_without_train_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no train folder: expected .*train/<class>/<image>"):
        load_splits(tmp_path, "imagefolder")


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere does not exist"):
        load_splits(tmp_path / "nowhere")


def test_single_class_is_rejected(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, {"only": 4})
    with pytest.raises(DataError, match="at least 2"):
        load_splits(tmp_path)


def test_no_val_possible_when_every_class_has_one_image(tmp_path: Path) -> None:
    make_imagefolder(tmp_path, {"a": 1, "b": 1})
    with pytest.raises(DataError, match="fewer than 2 training images"):
        load_splits(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fmt": "coco"}, "unknown dataset format"),
        ({"val_fraction": 0.0}, "val_fraction must be between 0 and 1"),
        ({"test_fraction": 1.0}, "test_fraction must be between 0 and 1"),
        ({"fmt": "imagefolder", "download": True}, "download=True needs the format"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    make_imagefolder(tmp_path, {"a": 2, "b": 2})
    with pytest.raises(DataError, match=message):
        load_splits(tmp_path, **kwargs)


# --- list files ---------------------------------------------------------------------------------


def make_list_images(root: Path) -> None:
    for name in ("a1", "a2", "a3", "b1", "b2", "b3"):
        write_image(root / "img" / f"{name}.jpg")


def test_list_folder_with_int_labels_and_header(tmp_path: Path) -> None:
    make_list_images(tmp_path)
    write_list(
        tmp_path / "train.csv", ["path,label", "img/a1.jpg,0", "img/a2.jpg,0", "img/b1.jpg,1"]
    )
    write_list(tmp_path / "val.csv", ["img/a3.jpg,0", "img/b2.jpg,1"])
    write_list(tmp_path / "test.csv", ["path,label", "img/b3.jpg,01"])
    splits = load_splits(tmp_path)
    assert splits.source == "list" and splits.val_origin == "official"
    assert splits.class_names == ["0", "1"]
    assert splits.train[0] == (tmp_path / "img" / "a1.jpg", 0)
    assert [label for _, label in splits.val] == [0, 1]
    assert splits.test == [(tmp_path / "img" / "b3.jpg", 1)]


def test_list_folder_with_names_tsv_and_txt(tmp_path: Path) -> None:
    make_list_images(tmp_path)
    write_list(tmp_path / "train.tsv", ["img/b1.jpg\tbee", "img/a1.jpg\tant", "img/a2.jpg\tant"])
    write_list(tmp_path / "val.txt", ["img/a3.jpg  ant", "", "img/b2.jpg bee"])
    splits = load_splits(tmp_path, "list")
    assert splits.class_names == ["ant", "bee"]
    assert [label for _, label in splits.train] == [1, 0, 0]
    assert [label for _, label in splits.val] == [0, 1]


def test_single_list_file_is_train_only(tmp_path: Path) -> None:
    make_list_images(tmp_path)
    lines = [f"img/{n}.jpg,{n[0]}" for n in ("a1", "a2", "a3", "b1", "b2", "b3")]
    splits = load_splits(write_list(tmp_path / "lists" / "all.csv", [f"../{x}" for x in lines]))
    assert splits.val_origin == "holdout" and splits.test is None
    assert counts(splits.val) == {0: 1, 1: 1}
    assert all(path.resolve().parent == tmp_path / "img" for path, _ in splits.train)


@pytest.mark.parametrize(
    "bad_line", ["img/a2.jpg", "img/a2.jpg,0,extra", "img/a2.jpg,", ",0"], ids=repr
)
def test_malformed_list_line_is_named(tmp_path: Path, bad_line: str) -> None:
    make_list_images(tmp_path)
    write_list(tmp_path / "train.csv", ["img/a1.jpg,0", bad_line, "img/b1.jpg,1"])
    with pytest.raises(DataError, match=r"train\.csv:2: expected `path,label`"):
        load_splits(tmp_path)


def test_list_label_not_in_train_is_named(tmp_path: Path) -> None:
    make_list_images(tmp_path)
    write_list(tmp_path / "train.csv", ["img/a1.jpg,ant", "img/b1.jpg,bee"])
    write_list(tmp_path / "val.csv", ["img/a2.jpg,ant", "img/b2.jpg,bat"])
    with pytest.raises(DataError, match=r"val\.csv:2: label 'bat' is not one of the classes"):
        load_splits(tmp_path)


def test_list_index_beyond_train_classes_is_named(tmp_path: Path) -> None:
    make_list_images(tmp_path)
    write_list(tmp_path / "train.csv", ["img/a1.jpg,0", "img/b1.jpg,1"])
    write_list(tmp_path / "test.csv", ["img/a2.jpg,5"])
    with pytest.raises(DataError, match=r"test\.csv:1: label '5'"):
        load_splits(tmp_path, "list")


def test_list_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no train list: expected train\.csv"):
        load_splits(tmp_path, "list")
    write_list(tmp_path / "train.csv", ["path,label"])
    with pytest.raises(DataError, match="lists no images"):
        load_splits(tmp_path, "list")
    write_list(tmp_path / "train.txt", ["a.jpg 0"])
    with pytest.raises(DataError, match="several train lists"):
        load_splits(tmp_path, "list")


# --- CUB-200-2011 -------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["", "CUB_200_2011"])
def test_cub_official_split(tmp_path: Path, inner: str) -> None:
    make_cub(tmp_path)
    splits = load_splits(tmp_path / inner, "cub")
    assert splits.class_names == CUB_CLASSES
    assert splits.test_origin == "official" and splits.val_origin == "holdout"
    assert counts(splits.test) == {0: 2, 1: 2, 2: 2}
    assert counts(splits.train) == counts(splits.val) == {0: 1, 1: 1, 2: 1}
    assert paths(splits.train + splits.val) == {
        tmp_path / "CUB_200_2011" / "images" / f"{CUB_CLASSES[i // 4]}/img_{i + 1:04d}.jpg"
        for i in range(12)
        if i % 4 < 2
    }


def test_cub_missing_file_is_named(tmp_path: Path) -> None:
    make_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "image_class_labels.txt").unlink()
    with pytest.raises(DataError, match=r"does not hold CUB-200-2011: missing \['image_class_"):
        load_splits(tmp_path, "cub")


def test_cub_bad_lines_are_named(tmp_path: Path) -> None:
    make_cub(tmp_path)
    labels = tmp_path / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("5 2\n", "5 9\n"))
    with pytest.raises(DataError, match=r"image_class_labels.txt has the unexpected value '9'"):
        load_splits(tmp_path, "cub")
    labels.write_text(labels.read_text().replace("5 9\n", "five 2\n"))
    with pytest.raises(DataError, match=r"image_class_labels.txt:5: expected `<id> <value>`"):
        load_splits(tmp_path, "cub")


# --- Stanford Cars ------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["", "stanford_cars"])
def test_cars_official_split(tmp_path: Path, inner: str) -> None:
    make_cars(tmp_path)
    splits = load_splits(tmp_path / inner, "cars")
    assert splits.class_names == CARS_CLASSES
    assert counts(splits.test) == {0: 2, 1: 2, 2: 2}
    assert counts(splits.train) == {0: 2, 1: 2, 2: 2} and counts(splits.val) == {0: 1, 1: 1, 2: 1}
    assert (splits.val_origin, splits.test_origin) == ("holdout", "official")


def test_cars_reader_agrees_with_torchvision(tmp_path: Path) -> None:
    """The fabricated devkit is what torchvision reads, and both readers agree on it."""
    make_cars(tmp_path)
    splits = load_splits(tmp_path, "cars")
    for split, ours in (("train", splits.train + splits.val), ("test", splits.test)):
        theirs = StanfordCars(str(tmp_path), split=split, loader=Path)
        assert sorted(ours) == sorted((path, label) for path, label in theirs)
        assert theirs.classes == splits.class_names


def test_cars_errors(tmp_path: Path) -> None:
    make_cars(tmp_path)
    (tmp_path / "stanford_cars" / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DataError, match=r"missing \['cars_test_annos_withlabels.mat'\]"):
        load_splits(tmp_path, "cars")
    # download=True on an existing tree reads it without going online (none here)
    make_cars(tmp_path / "fresh")
    assert load_splits(tmp_path / "fresh", "cars", download=True).num_classes == 3


# --- Oxford Flowers-102 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner", "fmt", "download"), [("", "auto", False), ("flowers-102", "flowers102", True)]
)
def test_flowers_official_splits(tmp_path: Path, inner: str, fmt: str, download: bool) -> None:
    """download=True finds the tree already there, so it does not go online (it could not)."""
    make_flowers(tmp_path)
    splits = load_splits(tmp_path / inner, fmt, download=download)
    assert splits.source == "flowers102"
    assert splits.class_names == ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
    assert (splits.val_origin, splits.test_origin) == ("official", "official")
    for samples in (splits.train, splits.val, splits.test):
        assert counts(samples) == {0: 2, 1: 2, 2: 2}
    assert (tmp_path / "flowers-102" / "jpg" / "image_00003.jpg", 0) in splits.val


def test_flowers_missing_setid_is_named(tmp_path: Path) -> None:
    make_flowers(tmp_path)
    (tmp_path / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(
        DataError, match=r"does not hold Oxford Flowers-102: missing \['setid.mat'\]"
    ):
        load_splits(tmp_path, "flowers102")


def test_flowers_unreadable_mat_is_named(tmp_path: Path) -> None:
    make_flowers(tmp_path)
    (tmp_path / "flowers-102" / "setid.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match=r"cannot read .*setid.mat"):
        load_splits(tmp_path, "flowers102")


# --- TU-Berlin sketch and WikiArt (no official test split) --------------------------------------


@pytest.mark.parametrize("inner", ["", "png"])
def test_sketch_gets_a_fixed_stratified_test_split(tmp_path: Path, inner: str) -> None:
    make_sketch(tmp_path, {"airplane": 10, "alarm clock": 10, "zebra": 5})
    first = load_splits(tmp_path / inner, "sketch", seed=0)
    other_seed = load_splits(tmp_path / inner, "sketch", seed=3)
    assert first.class_names == ["airplane", "alarm clock", "zebra"]
    assert (first.val_origin, first.test_origin) == ("holdout", "holdout")
    assert counts(first.test) == {0: 2, 1: 2, 2: 1}
    assert counts(first.val) == {0: 1, 1: 1, 2: 1}
    assert first.test == other_seed.test  # the test split does not move with the run's seed
    assert paths(first.val) != paths(other_seed.val)
    assert not paths(first.test) & paths(first.train + first.val)
    assert TEST_SPLIT_SEED == 0


def test_wikiart_as_class_folders_and_as_lists(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "folders", {"Baroque": 5, "Cubism": 5})
    folders = load_splits(tmp_path / "folders", "wikiart")
    assert folders.class_names == ["Baroque", "Cubism"] and folders.test_origin == "holdout"
    assert counts(folders.test) == {0: 1, 1: 1}

    lists = tmp_path / "lists"
    make_class_folders(lists, {"Baroque": 3, "Cubism": 3})
    write_list(
        lists / "train.csv", [f"{c}/{i:03d}.jpg,{c}" for c in ("Baroque", "Cubism") for i in (0, 1)]
    )
    write_list(lists / "test.csv", ["Baroque/002.jpg,Baroque", "Cubism/002.jpg,Cubism"])
    splits = load_splits(lists, "wikiart")
    assert splits.source == "wikiart" and splits.test_origin == "official"
    assert counts(splits.test) == {0: 1, 1: 1}


# --- format detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "build"),
    [
        ("imagefolder", lambda root: make_imagefolder(root, {"a": 2, "b": 2})),
        ("list", lambda root: write_list(root / "train.txt", ["x.jpg 0"]).parent),
        ("classfolders", lambda root: make_class_folders(root, {"a": 2})[0].parents[1]),
        ("cub", make_cub),
        ("cub", lambda root: make_cub(root) / "CUB_200_2011"),
        ("cars", make_cars),
        ("flowers102", make_flowers),
        ("sketch", lambda root: make_sketch(root, {"a": 2, "b": 2})),
    ],
)
def test_detect_format(tmp_path: Path, fmt: str, build) -> None:
    assert detect_format(build(tmp_path)) == fmt
    assert fmt in FORMATS


def test_detect_format_lists_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "CUB_200_2011" / "images" / "001.a").mkdir(parents=True)  # no image directly
    with pytest.raises(DataError, match=r"cannot tell .*flowers102: .*setid.mat.*cub: .*sketch"):
        load_splits(tmp_path)


# --- the real data, when the shared folder is there ---------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no real data at {REAL_DATA}")
def test_real_flowers102_and_gtsrb() -> None:
    flowers = load_splits(REAL_DATA / "flowers102")
    assert flowers.num_classes == 102 and flowers.val_origin == "official"
    assert (len(flowers.train), len(flowers.val), len(flowers.test)) == (1020, 1020, 6149)
    assert set(counts(flowers.train).values()) == {10}
    gtsrb = load_splits(REAL_DATA / "gtsrb")
    assert gtsrb.num_classes == 43 and gtsrb.val_origin == "holdout"
    assert len(gtsrb.train) + len(gtsrb.val) == 2580 and len(gtsrb.test) == 1674
    assert set(counts(gtsrb.val).values()) == {6}  # 10% of 60 per class
