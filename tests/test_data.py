"""Tests of facenets.data on small files written in the real formats; tests on the real data need FACENETS_DATA."""

import io
import os
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facenets import data
from facenets.data import EMOTIONS, DataError

# A small copy of the Kaggle layout: relative path -> gray level of the image.
FER_FILES = {
    "train/angry/Training_3.jpg": 10,
    "train/angry/Training_1.jpg": 20,
    "train/sad/Training_1.jpg": 30,  # same name as in angry/: a different image, both kept
    "train/Disgusted/extra.PNG": 40,  # alias folder, upper case, no Usage prefix
    "train/happy/PrivateTest_7.jpeg": 50,  # the prefix wins over the folder
    "test/surprise/PublicTest_2.jpg": 60,
    "test/fearful/PrivateTest_5.jpg": 70,
    "test/neutral/own_photo.jpg": 80,  # no prefix under test/: Usage "Test"
}
# (name, label, usage) in the order the readers must return them: train/ first, then test/, each sorted.
FER_EXPECTED = [
    ("train/Disgusted/extra.PNG", "disgust", "Training"),
    ("train/angry/Training_1.jpg", "angry", "Training"),
    ("train/angry/Training_3.jpg", "angry", "Training"),
    ("train/happy/PrivateTest_7.jpeg", "happy", "PrivateTest"),
    ("train/sad/Training_1.jpg", "sad", "Training"),
    ("test/fearful/PrivateTest_5.jpg", "fear", "PrivateTest"),
    ("test/neutral/own_photo.jpg", "neutral", "Test"),
    ("test/surprise/PublicTest_2.jpg", "surprise", "PublicTest"),
]


def write_fer_folders(root: Path) -> Path:
    for name, level in FER_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (48, 48), level).save(root / name)
    # Files the readers must pass over without a word.
    (root / "README.md").write_text("not an image")
    (root / "train/angry/.DS_Store").write_bytes(b"\0\1")
    (root / "train/angry/._Training_1.jpg").write_bytes(b"macOS resource fork")
    (root / "train/angry/notes.txt").write_text("not an image")
    return root


def check_fer_files(faces: data.FaceImages, strip: str = "") -> None:
    assert [name.removeprefix(strip) for name in faces.files] == [name for name, _, _ in FER_EXPECTED]
    assert faces.labels.tolist() == [EMOTIONS.index(label) for _, label, _ in FER_EXPECTED]
    assert faces.usage.tolist() == [data.USAGES.index(usage) for _, _, usage in FER_EXPECTED]
    assert faces.images.shape == (len(FER_EXPECTED), 1, 48, 48) and faces.images.dtype == torch.uint8
    assert faces.labels.dtype == torch.int64 and faces.usage.dtype == torch.int8
    assert faces.classes == EMOTIONS
    levels = faces.images.float().mean((1, 2, 3))
    expected = torch.tensor([FER_FILES[name] for name, _, _ in FER_EXPECTED], dtype=torch.float32)
    assert torch.allclose(levels, expected, atol=2)  # JPEG keeps a flat gray within a level or two


def one_line_error(call, *words) -> None:
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


# ---------------------------------------------------------------- FER-2013 readers


def test_folders_read_labels_usage_and_names(tmp_path):
    check_fer_files(data.fer2013_folders(write_fer_folders(tmp_path)))


def test_folders_convert_other_sizes_and_modes_with_one_warning(tmp_path):
    root = write_fer_folders(tmp_path)
    Image.new("RGB", (64, 64), (200, 0, 0)).save(root / "train/angry/Training_9.jpg")
    Image.new("L", (96, 96), 90).save(root / "train/angry/Training_8.png")
    with pytest.warns(UserWarning, match=r"converted 2 images .*Training_8.png, train/angry/Training_9.jpg"):
        faces = data.fer2013_folders(root)
    assert len(faces) == len(FER_EXPECTED) + 2 and faces.images.shape[1:] == (1, 48, 48)
    assert abs(faces.images[faces.files.index("train/angry/Training_8.png")].float().mean() - 90) < 1


def test_folders_skip_unreadable_images_with_a_warning(tmp_path):
    root = write_fer_folders(tmp_path)
    (root / "train/happy/Training_broken.jpg").write_bytes(b"this is no JPEG")
    jpeg = (root / "train/angry/Training_1.jpg").read_bytes()
    (root / "test/surprise/PublicTest_cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    with pytest.warns(
        UserWarning,
        match=r"skipped 2 unreadable images: train/happy/Training_broken.jpg, "
        r"test/surprise/PublicTest_cut.jpg",
    ):
        faces = data.fer2013_folders(root)
    check_fer_files(faces)


def test_folders_skip_an_image_over_pillows_bomb_limit_with_a_warning(tmp_path, monkeypatch):
    root = write_fer_folders(tmp_path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # 48x48 images stay under 2 x 5000 pixels, 120x120 do not
    Image.new("L", (120, 120), 10).save(root / "train/angry/Training_huge.png")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images: train/angry/Training_huge.png"):
        check_fer_files(data.fer2013_folders(root))


def test_folders_reject_an_unknown_class_folder(tmp_path):
    root = write_fer_folders(tmp_path)
    (root / "train/contempt").mkdir()
    Image.new("L", (48, 48)).save(root / "train/contempt/Training_4.jpg")
    one_line_error(lambda: data.fer2013_folders(root), "'train/contempt'", "angry", "disgusted", "surprise")


@pytest.mark.parametrize(
    "reader", [data.fer2013_folders, data.fer2013_zip, data.fer2013_csv, data.read_fer2013, data.load_fer2013]
)
def test_missing_path_says_where_to_get_the_data(tmp_path, reader):
    one_line_error(lambda: reader(tmp_path / "nowhere"), "nowhere", "does not exist", "Kaggle", "fer2013.csv")


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "train/angry").mkdir(parents=True)
    (tmp_path / "train/angry/notes.txt").write_text("no image")
    one_line_error(lambda: data.fer2013_folders(tmp_path), "no images", "train/<class>/")


def write_zip(path: Path, root: Path, top: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(root.rglob("*")):
            archive.write(file, top + file.relative_to(root).as_posix())
        if top:  # what a zip made on macOS carries along
            archive.writestr("__MACOSX/" + top + "train/angry/._Training_1.jpg", b"resource fork")
    return path


@pytest.mark.parametrize("top", ["", "fer2013/"])
def test_zip_reads_what_the_folders_hold(tmp_path, top):
    root = write_fer_folders(tmp_path / "fer2013")
    faces = data.fer2013_zip(write_zip(tmp_path / "archive.zip", root, top))
    check_fer_files(faces, strip=top)
    assert torch.equal(faces.images, data.fer2013_folders(root).images)


def test_zip_that_is_not_a_zip_is_an_error(tmp_path):
    (tmp_path / "archive.zip").write_bytes(b"PK but not really a zip file")
    one_line_error(lambda: data.fer2013_zip(tmp_path / "archive.zip"), "archive.zip", "not a readable zip")


def test_zip_skips_a_damaged_member_with_a_warning(tmp_path):
    root = write_fer_folders(tmp_path / "fer2013")
    Image.effect_noise((48, 48), 60).save(root / "train/angry/Training_noisy.png")  # noise does not compress
    path = write_zip(tmp_path / "archive.zip", root)
    content = bytearray(path.read_bytes())
    start = content.index(b"train/angry/Training_noisy.png") + 1000  # inside that member's data
    content[start : start + 16] = bytes(16)
    path.write_bytes(bytes(content))
    with pytest.warns(UserWarning, match="skipped 1 unreadable images: train/angry/Training_noisy.png"):
        check_fer_files(data.fer2013_zip(path))


def pixels_text(level: int, count: int = 2304) -> str:
    return " ".join(str((level + i) % 256) for i in range(count))


CSV_ROWS = [(0, 5, "Training"), (3, 100, "PublicTest"), (6, 250, "PrivateTest")]  # emotion, first pixel, Usage


@pytest.mark.parametrize(
    "header,order,pad",
    [
        ("emotion,pixels,Usage", (0, 1, 2), ""),  # fer2013.csv
        ("emotion, Usage, pixels", (0, 2, 1), " "),  # icml_face_data.csv: names with spaces, another column order
    ],
)
def test_csv_reads_both_kaggle_files(tmp_path, header, order, pad):
    lines = [header]
    for emotion, level, usage in CSV_ROWS:
        fields = [str(emotion), pixels_text(level), usage]
        lines.append(",".join(pad + fields[i] for i in order))
    (tmp_path / "fer.csv").write_text("\r\n".join(lines) + "\r\n\r\n")
    faces = data.fer2013_csv(tmp_path / "fer.csv")
    assert faces.labels.tolist() == [0, 3, 6] and faces.usage.tolist() == [0, 1, 2]
    assert faces.files == ["csv row 2", "csv row 3", "csv row 4"]
    assert faces.images.shape == (3, 1, 48, 48) and faces.images.dtype == torch.uint8
    expected = [[int(v) for v in pixels_text(level).split()] for _, level, _ in CSV_ROWS]
    assert faces.images.flatten(1).tolist() == expected  # row-major 48x48, exactly


@pytest.mark.parametrize(
    "bad_row,words",
    [
        ("0,1 2 3,Training", ["row 3", "has 3 pixel values", "2304"]),
        (f"7,{pixels_text(0)},Training", ["row 3", "'7'", "0-6"]),
        (f"x,{pixels_text(0)},Training", ["row 3", "'x'"]),
        (f"0,{pixels_text(0, 2303)} x,Training", ["row 3", "pixel"]),
        (f"0,{pixels_text(0, 2303)} 256,Training", ["row 3", "0-255"]),
        (f"0,{pixels_text(0)},Validation", ["row 3", "'Validation'", "PrivateTest"]),
        (f"0,{pixels_text(0)}", ["row 3", "2 fields"]),
    ],
)
def test_csv_bad_row_names_its_row(tmp_path, bad_row, words):
    (tmp_path / "fer2013.csv").write_text(f"emotion,pixels,Usage\n0,{pixels_text(0)},Training\n{bad_row}\n")
    one_line_error(lambda: data.fer2013_csv(tmp_path / "fer2013.csv"), "fer2013.csv", *words)


@pytest.mark.parametrize("content", ["label,pixels,Usage\n", "emotion,pixels\n", ""])
def test_csv_with_a_wrong_header_is_an_error(tmp_path, content):
    (tmp_path / "fer2013.csv").write_text(content + f"0,{pixels_text(0)},Training\n")
    one_line_error(lambda: data.fer2013_csv(tmp_path / "fer2013.csv"), "header", "emotion, pixels, Usage")


def test_csv_saved_by_a_spreadsheet_or_not_text_at_all(tmp_path):
    # Excel and others write a byte-order mark before the header: still the right header
    (tmp_path / "fer2013.csv").write_text(
        f"\ufeffemotion,pixels,Usage\n3,{pixels_text(0)},Training\n", encoding="utf-8"
    )
    assert data.fer2013_csv(tmp_path / "fer2013.csv").labels.tolist() == [3]
    (tmp_path / "fer2013.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 10)  # an image renamed to .csv
    one_line_error(lambda: data.fer2013_csv(tmp_path / "fer2013.csv"), "not a readable csv text file")


def test_empty_csv_says_so(tmp_path):
    (tmp_path / "fer2013.csv").write_text("")
    one_line_error(lambda: data.fer2013_csv(tmp_path / "fer2013.csv"), "is empty")


def test_read_fer2013_chooses_the_reader_by_path(tmp_path):
    root = write_fer_folders(tmp_path / "fer2013")
    check_fer_files(data.read_fer2013(root))
    check_fer_files(data.read_fer2013(write_zip(tmp_path / "FER.ZIP", root)))
    (tmp_path / "fer2013.csv").write_text(f"emotion,pixels,Usage\n4,{pixels_text(0)},Training\n")
    assert data.read_fer2013(tmp_path / "fer2013.csv").labels.tolist() == [4]
    (tmp_path / "fer2013.tar.gz").write_bytes(b"")
    one_line_error(lambda: data.read_fer2013(tmp_path / "fer2013.tar.gz"), "not a folder, a .zip or a .csv")


# ---------------------------------------------------------------- decode cache


def refuse_to_read(path):
    raise AssertionError("decoded again instead of loading the cache")


def test_cache_returns_the_same_images_without_decoding(tmp_path, monkeypatch):
    root = write_fer_folders(tmp_path / "fer2013")
    first = data.load_fer2013(root, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(data, "read_fer2013", refuse_to_read)
    again = data.load_fer2013(root, cache_dir=tmp_path / "cache")
    check_fer_files(again)
    assert torch.equal(again.images, first.images) and again.classes == first.classes
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".pt"]  # no temporary file left behind


def test_cache_notices_a_changed_folder_and_file(tmp_path):
    root = write_fer_folders(tmp_path / "fer2013")
    assert len(data.load_fer2013(root, cache_dir=tmp_path / "cache")) == len(FER_EXPECTED)
    Image.new("L", (48, 48)).save(root / "train/happy/Training_new.jpg")
    assert len(data.load_fer2013(root, cache_dir=tmp_path / "cache")) == len(FER_EXPECTED) + 1
    csv_file = tmp_path / "fer2013.csv"
    csv_file.write_text(f"emotion,pixels,Usage\n4,{pixels_text(0)},Training\n")
    assert data.load_fer2013(csv_file, cache_dir=tmp_path / "cache").labels.tolist() == [4]
    csv_file.write_text(f"emotion,pixels,Usage\n5,{pixels_text(0)},Training\n")
    os.utime(csv_file, ns=(1, 1))  # a new mtime even where the clock is coarse
    assert data.load_fer2013(csv_file, cache_dir=tmp_path / "cache").labels.tolist() == [5]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, damage):
    root = write_fer_folders(tmp_path / "fer2013")
    data.load_fer2013(root, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").iterdir()
    if damage == "garbage":
        cache.write_bytes(b"not a torch file")
    elif damage == "truncated":
        cache.write_bytes(cache.read_bytes()[:1000])
    else:  # loads fine but holds something else
        torch.save({"images": torch.zeros(3, 1, 48, 48), "labels": torch.zeros(2)}, cache)
    with pytest.warns(UserWarning, match="damaged cache"):
        check_fer_files(data.load_fer2013(root, cache_dir=tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: the next load is clean
        check_fer_files(data.load_fer2013(root, cache_dir=tmp_path / "cache"))


def test_cache_dir_comes_from_the_environment_and_may_be_unwritable(tmp_path, monkeypatch):
    root = write_fer_folders(tmp_path / "fer2013")
    monkeypatch.setenv("FACENETS_CACHE", str(tmp_path / "env-cache"))
    data.load_fer2013(root)
    assert len(list((tmp_path / "env-cache").glob("fer2013-*.pt"))) == 1
    (tmp_path / "a-file").write_text("")
    with pytest.warns(UserWarning, match="could not write the cache.*FACENETS_CACHE"):
        check_fer_files(data.load_fer2013(root, cache_dir=tmp_path / "a-file"))


def test_ctrl_c_while_the_cache_is_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    root = write_fer_folders(tmp_path / "fer2013")

    def interrupted(state, path):
        Path(path).write_bytes(b"half a cache")
        raise KeyboardInterrupt

    monkeypatch.setattr(data.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load_fer2013(root, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.undo()
    # a kill -9 runs no cleanup: the next load that writes the cache removes what a dead process left
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    data.load_fer2013(root, cache_dir=tmp_path / "cache")
    cache = next((tmp_path / "cache").glob("fer2013-*.pt"))
    orphan, alive = (cache.with_name(f"{cache.name}.{pid}.tmp") for pid in (int(dead.stdout), 1))  # 1: init, alive
    orphan.write_bytes(b"half"), alive.write_bytes(b"being written")
    cache.unlink()
    data.load_fer2013(root, cache_dir=tmp_path / "cache")
    assert not orphan.exists() and alive.exists()


# ---------------------------------------------------------------- splits


def test_stratified_split_is_exact_proportional_and_seeded():
    mixed = torch.randperm(147, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0] * 100 + [1] * 37 + [2] * 9 + [3] * 1)[mixed]
    parts = data.stratified_split(labels, [0.6, 0.25], seed=3)
    assert [len(p) for p in parts] == [88, 37]  # round(0.6 * 147), round(0.85 * 147) - 88
    assert all(torch.equal(p, p.sort().values) for p in parts)
    assert len(torch.cat(parts).unique()) == 125  # disjoint
    for part, fraction in zip(parts, [0.6, 0.25]):
        counts = labels[part].bincount(minlength=4)
        for label, size in enumerate([100, 37, 9, 1]):
            assert abs(counts[label] - fraction * size) <= 1, (label, counts)
    again = data.stratified_split(labels, [0.6, 0.25], seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    assert not torch.equal(parts[0], data.stratified_split(labels, [0.6, 0.25], seed=4)[0])
    with pytest.raises(ValueError):
        data.stratified_split(labels, [0.8, 0.3], seed=0)


def test_stratified_split_min_per_class_fills_the_first_part():
    labels = torch.tensor([0] * 1000 + [1] * 20 + [2] * 6)
    first, rest = data.stratified_split(labels, [0.1, 0.9], seed=0, min_per_class=8)
    assert labels[first].bincount().tolist() == [92, 8, 3]  # 8 of 20, 6 // 2 of 6; the total stays round(102.6)
    assert len(rest) == 923 and len(torch.cat([first, rest]).unique()) == 1026


def fake_faces(labels: list[int], usage: list[str]) -> data.FaceImages:
    n = len(labels)
    return data.FaceImages(
        torch.zeros(n, 1, 1, 1, dtype=torch.uint8),
        torch.tensor(labels),
        torch.tensor([data.USAGES.index(u) for u in usage], dtype=torch.int8),
        [f"image {i}" for i in range(n)],
        EMOTIONS,
    )


def test_subset_keeps_the_fields_together():
    faces = fake_faces([0, 1, 2], ["Training", "PublicTest", "Test"])
    part = faces.subset(torch.tensor([2, 0]))
    assert part.labels.tolist() == [2, 0] and part.usage.tolist() == [3, 0] and part.files == ["image 2", "image 0"]
    assert len(part) == 2 and part.images.shape == (2, 1, 1, 1) and part.classes == EMOTIONS
    with pytest.raises(ValueError, match="differ in length"):
        data.FaceImages(faces.images, faces.labels[:2], faces.usage, faces.files, EMOTIONS)


def real_sized_faces(private: int = 0) -> data.FaceImages:
    """Labels and Usage shaped like the real FER-2013 Kaggle copy (tiny images)."""
    train = [3995, 436, 4097, 7215, 4830, 3171, 4965]
    labels = [c for c, n in enumerate(train) for _ in range(n)] + [i % 7 for i in range(3589 + private)]
    usage = ["Training"] * 28709 + ["PublicTest"] * 3589 + ["PrivateTest"] * private
    return fake_faces(labels, usage)


def as_set(index: torch.Tensor) -> set:
    return set(index.tolist())


def test_official_split_takes_val_from_training_only():
    faces = real_sized_faces()
    split = data.split_indices(faces, "official", val_fraction=0.1, seed=0)
    training = as_set((faces.usage == 0).nonzero().flatten())
    assert as_set(split["train"]) | as_set(split["val"]) == training
    assert not as_set(split["train"]) & as_set(split["val"])
    assert as_set(split["test"]) == set(range(len(faces))) - training
    assert len(split["val"]) == 2871
    assert faces.labels[split["val"]].bincount()[1] in (43, 44)  # disgust: 10% of 436
    no_val = data.split_indices(faces, "official")
    assert len(no_val["val"]) == 0 and as_set(no_val["train"]) == training
    assert all(v.dtype == torch.int64 for v in split.values())


def test_monterrey_split_has_the_report_sizes():
    faces = real_sized_faces()
    split = data.split_indices(faces, "monterrey", seed=5)
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (20099, 2151, 3589)
    assert (faces.usage[split["train"]] == 0).all() and (faces.usage[split["val"]] == 0).all()
    assert not as_set(split["train"]) & as_set(split["val"])
    assert abs(faces.labels[split["val"]].bincount()[3] - 540.6) <= 1  # happy: 2151 / 28709 of 7215


def test_publictest_split_needs_privatetest_images():
    one_line_error(lambda: data.split_indices(real_sized_faces(), "publictest"), "no PrivateTest", "--split official")
    faces = real_sized_faces(private=100)
    split = data.split_indices(faces, "publictest")
    assert [faces.usage[split[k]].unique().tolist() for k in ("train", "val", "test")] == [[0], [1], [2]]
    assert [len(split[k]) for k in ("train", "val", "test")] == [28709, 3589, 100]


def test_pooled_splits_udine_and_utec():
    faces = fake_faces([0] * 600 + [1] * 60 + [2] * 10 + [3] * 3, ["Training"] * 400 + ["PublicTest"] * 273)
    udine = data.split_indices(faces, "udine", seed=2)
    assert [len(udine[k]) for k in ("train", "val", "test")] == [471, 101, 101]  # 70 / 15 / 15 of 673
    assert as_set(udine["train"]) | as_set(udine["val"]) | as_set(udine["test"]) == set(range(673))
    assert (faces.usage[udine["test"]] == 0).any()  # pooled: Training images reach the test part too
    test_counts = faces.labels[udine["test"]].bincount(minlength=4)
    assert all(abs(test_counts[c] - 0.15 * n) <= 1 for c, n in enumerate([600, 60, 10, 3])), test_counts
    assert not torch.equal(udine["train"], data.split_indices(faces, "udine", seed=3)["train"])
    utec = data.split_indices(faces, "utec", seed=2)
    assert len(utec["val"]) == 0 and [len(utec["train"]), len(utec["test"])] == [471, 202]
    train_counts = faces.labels[utec["train"]].bincount()
    assert all(train_counts[c] >= min(50, n // 2) for c, n in enumerate([600, 60, 10, 3]))


def test_split_errors_are_one_line():
    faces = fake_faces([0, 1, 2], ["Training", "PublicTest", "Test"])
    one_line_error(lambda: data.split_indices(faces, "random"), "'random'", *data.SPLITS)
    one_line_error(lambda: data.split_indices(faces, "official", val_fraction=1.5), "1.5")
    only_test = fake_faces([0, 1], ["Test", "Test"])
    one_line_error(lambda: data.split_indices(only_test, "official"), "no Training images")


# ---------------------------------------------------------------- synthetic faces


def test_synthetic_faces_are_deterministic_balanced_and_learnable():
    faces = data.synthetic_faces(2800, seed=0)
    assert faces.images.shape == (2800, 1, 48, 48) and faces.images.dtype == torch.uint8
    assert faces.labels.dtype == torch.int64 and faces.usage.dtype == torch.int8 and faces.classes == EMOTIONS
    assert faces.labels.bincount().tolist() == [400] * 7
    assert faces.usage.tolist() == [0] * 2240 + [1] * 560
    assert faces.labels[faces.usage == 1].bincount().tolist() == [80] * 7
    assert torch.equal(faces.images, data.synthetic_faces(2800, seed=0).images)
    assert not torch.equal(faces.images, data.synthetic_faces(2800, seed=1).images)
    # Not trivial: pixels vary a lot within a class. Learnable: a nearest-class-mean classifier on per-image
    # standardized pixels beats 50% on held-out faces (7 classes: chance is 14%).
    pixels = faces.images.flatten(1).float()
    pixels = (pixels - pixels.mean(1, keepdim=True)) / pixels.std(1, keepdim=True)
    train = faces.usage == 0
    means = torch.stack([pixels[train & (faces.labels == c)].mean(0) for c in range(7)])
    accuracy = (torch.cdist(pixels[~train], means).argmin(1) == faces.labels[~train]).float().mean()
    assert 0.5 < accuracy < 0.95, accuracy


# ---------------------------------------------------------------- MTCNN face crops


def face_photo(face: torch.Tensor, size: int = 160, canvas=(320, 240), at=(80, 40)) -> Image.Image:
    """A 48x48 face enlarged onto a plain background, which MTCNN finds."""
    photo = Image.new("L", canvas, 90)
    photo.paste(Image.fromarray(face[0].numpy()).resize((size, size), Image.BICUBIC), at)
    return photo.convert("RGB")


def test_detect_faces_finds_nothing_in_noise():
    assert data.detect_faces(Image.effect_noise((200, 160), 80)) == []
    assert data.detect_faces(Image.new("RGB", (200, 160), (128, 128, 128))) == []
    assert data.detect_faces(Image.new("RGB", (300, 19))) == []  # too small for MTCNN, which would fail


def test_detect_faces_finds_two_faces_biggest_first():
    happy = data.synthetic_faces(7).images[3]  # a face MTCNN finds (the drawing is deterministic)
    photo = face_photo(happy, canvas=(400, 240), at=(10, 40))
    photo.paste(face_photo(happy, size=110, canvas=(110, 110), at=(0, 0)), (260, 60))
    boxes = data.detect_faces(photo)
    assert len(boxes) == 2 and all(isinstance(v, float) for v in boxes[0])
    assert boxes[0][2] < 200 < boxes[1][0]  # the big face on the left comes first


class SmallFirstDetector:
    """Stands in for MTCNN, which on real photos may list a small face first."""

    def detect(self, image):
        return np.array([[0, 0, 10, 10], [20, 10, 60, 50], [0, 40, 15, 60]], dtype=np.float32), np.ones(3)


def test_the_biggest_face_comes_first_and_is_the_one_cropped(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_mtcnn", lambda device: SmallFirstDetector())
    photo = Image.new("L", (64, 64))
    photo.paste(255, (20, 10, 60, 50))  # only the biggest "face" is white
    assert data.detect_faces(photo) == [(20, 10, 60, 50), (0, 40, 15, 60), (0, 0, 10, 10)]
    (tmp_path / "photos/People").mkdir(parents=True)
    photo.save(tmp_path / "photos/People/group.png")
    faces = data.face_folders(tmp_path / "photos", cache_dir=tmp_path / "cache")
    assert faces.classes == ("People",) and faces.images.float().mean() > 150


def test_crop_face_is_a_square_with_margin():
    photo = Image.new("RGB", (100, 80), (0, 0, 0))
    photo.paste((255, 255, 255), (50, 0, 100, 80))  # right half white
    # Box 40 wide around (30, 40); margin 0.25 widens it to the square x 0..60, y 10..70: white from column 50.
    crop = data.crop_face(photo, (10, 20, 50, 60), size=60, margin=0.25)
    assert crop.shape == (1, 60, 60) and crop.dtype == torch.uint8
    assert crop[0, :, :50].max() == 0 and crop[0, :, 50:].min() == 255
    edge = data.crop_face(photo, (80, 50, 100, 80), size=48, grayscale=False, margin=0.5)
    assert edge.shape == (3, 48, 48) and edge[:, -1, -1].tolist() == [0, 0, 0]  # beyond the photo: black
    assert edge[:, 20, 20].tolist() == [255, 255, 255]
    # A box overflowing a tight face crop (MTCNN on a UTKFace chip): inside=True sees the whole photo, no black frame
    whole = data.crop_face(photo, (-30, -40, 110, 110), size=40, grayscale=False, inside=True)
    assert torch.equal(whole, data.crop_face(photo, (0, 0, 80, 80), size=40, grayscale=False, margin=0.0))
    assert whole.float().mean() > 0 and whole[:, :, -1].min() == 255  # the white right half reaches the edge


def test_face_folders_skip_photos_without_a_face_and_broken_ones(tmp_path, monkeypatch):
    happy = data.synthetic_faces(7).images[3]
    for name in ("surprised", "happy"):
        (tmp_path / "photos" / name).mkdir(parents=True)
    face_photo(happy).save(tmp_path / "photos/happy/me.jpg")
    Image.effect_noise((200, 160), 80).save(tmp_path / "photos/happy/wall.png")
    (tmp_path / "photos/surprised/broken.jpg").write_bytes(b"not a photo")
    # Stored sideways with an EXIF note to turn it, as phones do; MTCNN needs it upright.
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    face_photo(happy).rotate(90, expand=True).save(tmp_path / "photos/surprised/also_me.jpg", exif=exif)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        faces = data.face_folders(tmp_path / "photos", size=40, classes=EMOTIONS, cache_dir=tmp_path / "cache")
    messages = [str(w.message) for w in caught]
    assert "skipped 1 unreadable photos: surprised/broken.jpg" in messages
    assert "skipped 1 photos where no face was found: happy/wall.png" in messages
    assert faces.files == ["happy/me.jpg", "surprised/also_me.jpg"]
    assert faces.labels.tolist() == [EMOTIONS.index("happy"), EMOTIONS.index("surprise")]
    assert faces.images.shape == (2, 1, 40, 40) and faces.usage.tolist() == [0, 0]
    monkeypatch.setattr(data, "_crop_face_folders", lambda *args: refuse_to_read(None))
    again = data.face_folders(tmp_path / "photos", size=40, classes=EMOTIONS, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, faces.images)


def test_face_folders_skip_a_photo_over_pillows_bomb_limit(tmp_path, monkeypatch):
    (tmp_path / "photos" / "happy").mkdir(parents=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    Image.new("RGB", (120, 120)).save(tmp_path / "photos/happy/huge.png")
    Image.new("RGB", (60, 60)).save(tmp_path / "photos/happy/small.png")
    monkeypatch.setattr(data, "detect_faces", lambda image, device="cpu": [(5, 5, 50, 50)])
    with pytest.warns(UserWarning, match="skipped 1 unreadable photos: happy/huge.png"):
        faces = data.face_folders(tmp_path / "photos", classes=EMOTIONS, cache_dir=tmp_path / "cache")
    assert faces.files == ["happy/small.png"]


def test_face_folders_errors(tmp_path):
    (tmp_path / "contempt").mkdir()
    Image.effect_noise((64, 64), 80).save(tmp_path / "contempt/a.png")
    one_line_error(
        lambda: data.face_folders(tmp_path, classes=EMOTIONS, cache_dir=tmp_path / "c"),
        "'contempt'",
        "surprise",
        "surprised",
    )
    with pytest.warns(UserWarning, match="no face was found"):
        one_line_error(lambda: data.face_folders(tmp_path, cache_dir=tmp_path / "c"), "no face found", "1 photos")
    one_line_error(lambda: data.face_folders(tmp_path / "contempt", cache_dir=tmp_path / "c"), "no photos")


def test_missing_facenet_pytorch_is_a_data_error(monkeypatch):
    data._mtcnn.cache_clear()
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # makes the import fail
    try:
        one_line_error(lambda: data.detect_faces(Image.new("RGB", (64, 64))), "pip install facenet-pytorch")
    finally:
        data._mtcnn.cache_clear()


# ---------------------------------------------------------------- 16-bit images, zip bombs, unreadable files


def gradient_16_bit(path: Path, width: int = 256, height: int = 48) -> np.ndarray:
    """A 16-bit grayscale PNG whose columns run 0..65535 left to right; returns the 8-bit gradient it stands for."""
    levels = np.linspace(0, 65535, width).round()
    Image.fromarray(np.tile(levels.astype(np.uint16), (height, 1))).save(path)
    assert Image.open(path).mode in ("I;16", "I")  # what Pillow makes of a 16-bit PNG
    return np.round(levels * 255 / 65535)


def test_a_16_bit_png_decodes_to_the_matching_8_bit_gradient(tmp_path):
    root = write_fer_folders(tmp_path / "fer2013")
    expected = gradient_16_bit(root / "train/angry/Training_16bit.png", width=48)
    faces = data.fer2013_folders(root)
    fer = faces.images[faces.files.index("train/angry/Training_16bit.png"), 0].numpy()
    (tmp_path / "faces").mkdir()
    expected_rgb = gradient_16_bit(tmp_path / "faces/gradient.png", height=256)
    rgb = data.load_face_images(tmp_path / "faces", 256, cache_dir=tmp_path / "cache").images[0].numpy()
    photo = np.asarray(data.open_photo(tmp_path / "faces/gradient.png"))
    # exact but for rounding at the middle of a level (none of these lie there): within one of 256 levels
    assert np.abs(fer - expected).max() <= 1 and (fer == 255).mean() < 0.05  # was 99.6% white
    assert all(np.abs(channel - expected_rgb).max() <= 1 for channel in rgb[:, 0])
    assert np.abs(photo[0, :, 1] - expected_rgb).max() <= 1


def declare_size(path: Path, member: str, size: int) -> None:
    """Make the zip's central directory declare size bytes for member, as a crafted zip can."""
    content = bytearray(path.read_bytes())
    entry = content.index(b"PK\x01\x02")  # the central directory's entries, each with its name at byte 46
    while content[entry + 46 : entry + 46 + len(member)] != member.encode():
        entry = content.index(b"PK\x01\x02", entry + 4)
    content[entry + 24 : entry + 28] = size.to_bytes(4, "little")  # its uncompressed size field
    path.write_bytes(bytes(content))


def test_zip_members_beyond_the_size_bounds_are_skipped_without_being_inflated(tmp_path, monkeypatch):
    path = tmp_path / "faces.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("ok.png", "huge.png"):
            archive.writestr(name, face_png())
        archive.writestr("zeros.png", bytes(3 << 20))  # 3 MB that deflate packs into a few kB: a zip bomb's ratio
        archive.writestr("noise.png", np.random.default_rng(0).bytes(300_000))  # barely compressible
    declare_size(path, "huge.png", 3_000_000_000)  # inflating it took 7.2 GB of memory
    monkeypatch.setattr(data, "ZIP_MEMBER_MAX_BYTES", 200_000, raising=False)  # lowered: noise.png exceeds it
    opened, real_open = [], zipfile.ZipFile.open

    def open_member(archive, member, *args, **kwargs):  # archive.read(name) opens it too: every inflation is seen
        opened.append(getattr(member, "filename", member))
        return real_open(archive, member, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_member)
    with pytest.warns(
        UserWarning,
        match=r"skipped 3 zip members that would inflate to over 200.0 kB or to over 100x "
        r"their packed size.*: huge.png, noise.png, zeros.png",
    ):
        faces = data.load_face_images(path, 16, cache_dir=tmp_path / "cache")
    assert faces.files == ["ok.png"] and opened == ["ok.png"]


def face_png(size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (120, 90, 80)).save(buffer, "PNG")
    return buffer.getvalue()


def test_every_zip_reader_checks_the_declared_size(tmp_path):
    root = write_fer_folders(tmp_path / "fer2013")
    path = write_zip(tmp_path / "archive.zip", root)
    declare_size(path, "train/angry/Training_1.jpg", 3_000_000_000)
    with pytest.warns(UserWarning, match="skipped 1 zip members .*: train/angry/Training_1.jpg"):
        faces = data.fer2013_zip(path)
    assert "train/angry/Training_1.jpg" not in faces.files and len(faces) == len(FER_EXPECTED) - 1


def test_a_csv_with_a_wide_wrong_header_shows_its_start(tmp_path):
    # another Kaggle layout: one column per pixel; textwrap.shorten reduced its header to '[...]'
    (tmp_path / "fer2013.csv").write_text("emotion," + ",".join(f"pixel_{i}" for i in range(2304)) + "\n")
    one_line_error(
        lambda: data.fer2013_csv(tmp_path / "fer2013.csv"),
        "'emotion,pixel_0,pixel_1,",
        "(2305 fields)",
        "expected the columns emotion, pixels, Usage",
    )


@pytest.fixture
def unreadable(monkeypatch):
    """unreadable(path): from now on path behaves as it would without read permission (the tests run as root, for
    whom chmod 000 changes nothing): listing it or opening it raises PermissionError."""
    paths, listdir, scandir, io_open = set(), os.listdir, os.scandir, io.open

    def guarded(real):
        def call(path=".", *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and os.fspath(path) in paths:
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "listdir", guarded(listdir))
    monkeypatch.setattr(os, "scandir", guarded(scandir))
    monkeypatch.setattr(io, "open", guarded(io_open))
    return lambda path: paths.add(os.fspath(path))


@pytest.mark.parametrize(
    "locked, read",
    [
        ("fer2013", lambda root: data.fer2013_folders(root / "fer2013")),
        (
            "fer2013/train/angry",
            lambda root: data.fer2013_folders(root / "fer2013"),
        ),  # glob passed over it: a class lost
        ("archive.zip", lambda root: data.fer2013_zip(root / "archive.zip")),
        ("fer2013.csv", lambda root: data.fer2013_csv(root / "fer2013.csv")),
        ("fer2013", lambda root: data.load_face_images(root / "fer2013", 16, cache_dir=root / "cache")),
        ("fer2013", lambda root: data.load_utkface(root / "fer2013", 16, cache_dir=root / "cache")),
    ],
)
def test_what_cannot_be_read_is_one_line_saying_so(tmp_path, unreadable, locked, read):
    write_zip(tmp_path / "archive.zip", write_fer_folders(tmp_path / "fer2013"))
    (tmp_path / "fer2013.csv").write_text("emotion,pixels,Usage\n")
    unreadable(tmp_path / locked)
    one_line_error(
        lambda: read(tmp_path), str(tmp_path / locked), "cannot be read (Permission denied)", "check its permissions"
    )


def test_face_images_skip_a_subfolder_that_cannot_be_read_with_one_warning(tmp_path, unreadable):
    for folder, count in (("a", 3), ("b/locked", 2)):
        (tmp_path / "faces" / folder).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (16, 16), (40 * i, 80, 80)).save(tmp_path / "faces" / folder / f"{i}.png")
    unreadable(tmp_path / "faces/b/locked")
    with pytest.warns(UserWarning, match=r"skipped 1 folders that cannot be read \(check their permissions\): b/lock"):
        faces = data.load_face_images(tmp_path / "faces", 16, cache_dir=tmp_path / "cache")
    assert faces.files == ["a/0.png", "a/1.png", "a/2.png"]


# ---------------------------------------------------------------- the real data (FACENETS_DATA)


@pytest.fixture(scope="module")
def real_fer2013(tmp_path_factory):
    root = Path(os.environ.get("FACENETS_DATA", "/nonexistent")) / "fer2013"
    if not root.is_dir():
        pytest.skip("set FACENETS_DATA to the folder holding fer2013/ to test on the real data")
    cache = tmp_path_factory.mktemp("cache")
    data.load_fer2013(root, cache_dir=cache)
    start = time.perf_counter()
    faces = data.load_fer2013(root, cache_dir=cache)
    return faces, time.perf_counter() - start


def test_real_fer2013_counts_usage_and_cached_load_time(real_fer2013):
    faces, cached_seconds = real_fer2013
    assert cached_seconds < 2, f"cached load took {cached_seconds:.1f} s"
    train = faces.usage == data.USAGES.index("Training")
    assert int(train.sum()) == 28709 and int((faces.usage == data.USAGES.index("PublicTest")).sum()) == 3589
    counts = dict(zip(EMOTIONS, faces.labels[train].bincount().tolist()))
    assert counts == {
        "angry": 3995,
        "disgust": 436,
        "fear": 4097,
        "happy": 7215,
        "neutral": 4965,
        "sad": 4830,
        "surprise": 3171,
    }
    assert all(name.split("/")[2].startswith(data.USAGES[u]) for name, u in zip(faces.files, faces.usage.tolist()))
    for shared_name in ("/Training_52789098.jpg", "/Training_8475486.jpg"):  # two images each: both kept
        assert sum(name.endswith(shared_name) for name in faces.files) == 2
    split = data.split_indices(faces, "monterrey")
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (20099, 2151, 3589)


def test_real_face_is_found_and_cropped(real_fer2013, tmp_path):
    faces, _ = real_fer2013
    happy = faces.subset((faces.labels == EMOTIONS.index("happy")).nonzero().flatten()[:3])
    (tmp_path / "happy").mkdir()
    for i, face in enumerate(happy.images):
        face_photo(face).save(tmp_path / f"happy/photo{i}.png")
    boxes = data.detect_faces(Image.open(tmp_path / "happy/photo0.png"))
    assert boxes and 60 < boxes[0][0] < 140 and 160 < boxes[0][2] < 260  # on the pasted face (x 80..240)
    cropped = data.face_folders(tmp_path, classes=EMOTIONS, cache_dir=tmp_path / "cache")
    assert len(cropped) == 3 and cropped.images.shape == (3, 1, 48, 48)
    assert cropped.labels.tolist() == [EMOTIONS.index("happy")] * 3
