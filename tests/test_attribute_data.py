"""Tests of the face-attribute readers in facenets.data (CelebA, UTKFace, synthetic attribute faces) on small files
written in the real formats; the test on the real UTKFace copy needs FACENETS_DATA."""

import os
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from facenets import data
from facenets.data import DataError

CELEBA_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young"
).split()
CELEBA_COUNT = 12
CELEBA_FILES = [f"{i:06d}.jpg" for i in range(1, CELEBA_COUNT + 1)]
# A fixed pattern of -1/1 values, one row per image, and the official partition: 8 train, 2 val, 2 test.
CELEBA_VALUES = [[1 if (i * 7 + k * 3) % 5 < 2 else -1 for k in range(40)] for i in range(CELEBA_COUNT)]
CELEBA_PARTITION = [0] * 8 + [1] * 2 + [2] * 2
WIDTH, HEIGHT = 16, 20  # CelebA's 178x218 shrunk: the same portrait shape, tiny


def celeba_colour(i: int) -> tuple[int, int, int]:
    return (20 * i, 240 - 20 * i, 100)


def celeba_image(i: int) -> Image.Image:
    """A flat colour with white bands over the top and bottom 2 rows: the centre square leaves them out."""
    image = Image.new("RGB", (WIDTH, HEIGHT), celeba_colour(i))
    image.paste((255, 255, 255), (0, 0, WIDTH, 2))
    image.paste((255, 255, 255), (0, HEIGHT - 2, WIDTH, HEIGHT))
    return image


def write_celeba(root: Path, lists: str = "txt", images: str = "folder") -> Path:
    """CelebA's files in their exact formats. lists: "txt" (official) or "csv" (Kaggle); images: "folder",
    "zip" (img_align_celeba/<name>) or "nested zip" (img_align_celeba/img_align_celeba/<name>, Kaggle's)."""
    root.mkdir(parents=True, exist_ok=True)
    if lists == "txt":
        # As the official file: the count, the names with a trailing space, values aligned by padding to width 2.
        rows = [f"{name} " + " ".join(f"{v:2d}" for v in values) for name, values in zip(CELEBA_FILES, CELEBA_VALUES)]
        (root / "list_attr_celeba.txt").write_text(
            f"{CELEBA_COUNT}\n" + " ".join(CELEBA_NAMES) + " \n" + "\n".join(rows) + "\n"
        )
        (root / "list_eval_partition.txt").write_text(
            "".join(f"{name} {part}\n" for name, part in zip(CELEBA_FILES, CELEBA_PARTITION))
        )
    else:
        rows = [",".join([name, *map(str, values)]) for name, values in zip(CELEBA_FILES, CELEBA_VALUES)]
        (root / "list_attr_celeba.csv").write_text("\n".join(["image_id," + ",".join(CELEBA_NAMES), *rows]) + "\n")
        (root / "list_eval_partition.csv").write_text(
            "image_id,partition\n" + "".join(f"{name},{part}\n" for name, part in zip(CELEBA_FILES, CELEBA_PARTITION))
        )
    if images == "folder":
        (root / "img_align_celeba").mkdir()
        for i, name in enumerate(CELEBA_FILES):
            celeba_image(i).save(root / "img_align_celeba" / name, quality=95)
    else:
        folder = "img_align_celeba/img_align_celeba/" if images == "nested zip" else "img_align_celeba/"
        with zipfile.ZipFile(root / "img_align_celeba.zip", "w") as archive:
            for i, name in enumerate(CELEBA_FILES):
                celeba_image(i).save(root / name, quality=95)
                archive.write(root / name, folder + name)
                (root / name).unlink()
            archive.writestr("__MACOSX/img_align_celeba/._000001.jpg", b"resource fork")
    return root


def one_line_error(call, *words) -> None:
    with pytest.raises(DataError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message


# ---------------------------------------------------------------- CelebA labels


@pytest.mark.parametrize("lists", ["txt", "csv"])
def test_celeba_labels_read_from_the_official_txt_and_the_kaggle_csv(tmp_path, lists):
    files, attributes, names, partition = data.read_celeba_labels(write_celeba(tmp_path, lists))
    assert files == CELEBA_FILES and names == tuple(CELEBA_NAMES)
    assert attributes.dtype == torch.int64 and attributes.shape == (CELEBA_COUNT, 40)
    assert attributes.tolist() == [[(v + 1) // 2 for v in values] for values in CELEBA_VALUES]  # -1/1 -> 0/1
    assert partition.dtype == torch.int8 and partition.tolist() == CELEBA_PARTITION


def test_celeba_without_a_partition_list_warns_and_gives_minus_one(tmp_path):
    root = write_celeba(tmp_path)
    (root / "list_eval_partition.txt").unlink()
    with pytest.warns(UserWarning, match="no list_eval_partition.txt.*partition -1"):
        partition = data.read_celeba_labels(root)[3]
    assert partition.tolist() == [-1] * CELEBA_COUNT
    one_line_error(
        lambda: data.concepcion_sample(torch.ones(CELEBA_COUNT, 1), partition, 0, (2, 0, 0)),
        "no official partition",
        "list_eval_partition.txt",
    )
    # the official split needs it: then its absence is the error, naming where it was looked for
    one_line_error(
        lambda: data.read_celeba_labels(root, need_partition=True),
        f"no list_eval_partition.txt or list_eval_partition.csv in {root.absolute()}",
        "official",
        "download CelebA's",
    )


def replace_line(path: Path, number: int, text: str | None) -> None:
    """Line number (1-based) of path replaced by text, or deleted for None."""
    lines = path.read_text().splitlines()
    lines[number - 1 : number] = [] if text is None else [text]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "file,line,text,words",
    [
        ("list_attr_celeba.txt", 1, "13", ["list_attr_celeba.txt line 1", "13 images", "12 are listed"]),
        ("list_attr_celeba.txt", 1, "twelve", ["list_attr_celeba.txt line 1", "'twelve'", "image count"]),
        ("list_attr_celeba.txt", 5, "000003.jpg 1 -1", ["list_attr_celeba.txt line 5", "3 fields", "expected 41"]),
        ("list_attr_celeba.txt", 4, "000002.jpg" + " 0" * 40, ["list_attr_celeba.txt line 4", "'0'", "-1 or 1"]),
        ("list_attr_celeba.txt", 4, "000001.jpg" + " 1" * 40, ["line 4", "000001.jpg a second time"]),
        ("list_attr_celeba.csv", 3, "000002.jpg" + ",yes" * 40, ["list_attr_celeba.csv line 3", "'yes'", "-1 or 1"]),
        ("list_attr_celeba.csv", 1, "name,Male", ["list_attr_celeba.csv", "header", "image_id"]),
        ("list_eval_partition.txt", 2, "000002.jpg 3", ["list_eval_partition.txt line 2", "'3'", "0 (train)"]),
        ("list_eval_partition.txt", 2, "000002.jpg", ["list_eval_partition.txt line 2", "1 fields", "expected 2"]),
        ("list_eval_partition.txt", 7, None, ["000007.jpg is in list_attr_celeba.txt but not in list_eval_partition"]),
        (
            "list_eval_partition.txt",
            13,
            "000099.jpg 2",
            ["000099.jpg is in list_eval_partition.txt but not in list_attr_celeba.txt"],
        ),
        ("list_eval_partition.csv", 1, "image_id,part", ["list_eval_partition.csv", "header", "image_id,partition"]),
    ],
)
def test_celeba_bad_lists_name_the_file_and_line(tmp_path, file, line, text, words):
    root = write_celeba(tmp_path, lists=file[-3:])
    if line > CELEBA_COUNT:  # a line after the last
        (root / file).write_text((root / file).read_text() + text + "\n")
    else:
        replace_line(root / file, line, text)
    one_line_error(lambda: data.read_celeba_labels(root), *words)


def test_celeba_missing_or_unreadable_lists_say_what_to_get(tmp_path):
    one_line_error(
        lambda: data.read_celeba_labels(tmp_path / "nowhere"),
        f"{tmp_path / 'nowhere'} does not exist",
        "CelebA's lists (list_attr_celeba.txt, list_eval_partition.txt) were not found",
        "download",
    )
    one_line_error(
        lambda: data.read_celeba_labels(tmp_path),
        "CelebA's lists were not found",
        f"no list_attr_celeba.txt or list_attr_celeba.csv in {tmp_path}",
        "download",
    )
    (tmp_path / "list_attr_celeba.txt").write_text("")
    one_line_error(lambda: data.read_celeba_labels(tmp_path), "list_attr_celeba.txt is empty")
    (tmp_path / "list_attr_celeba.txt").write_bytes(b"\xff\xfe\x00 binary" * 10)
    one_line_error(lambda: data.read_celeba_labels(tmp_path), "not a readable text file")


def test_select_attributes_by_name_or_all():
    assert data.select_attributes(CELEBA_NAMES, ["Smiling", "Male", "Eyeglasses", "Male"]) == [31, 20, 15]
    assert data.select_attributes(CELEBA_NAMES, ["all"]) == list(range(40))
    one_line_error(lambda: data.select_attributes(CELEBA_NAMES, ["smiling"]), "'smiling'", "Smiling", "case-sensitive")
    one_line_error(lambda: data.select_attributes(CELEBA_NAMES, ["Glasses"]), "Eyeglasses")
    one_line_error(lambda: data.select_attributes(CELEBA_NAMES, ["qqq"]), "'qqq'", "5_o_Clock_Shadow", "Young", "all")
    one_line_error(lambda: data.select_attributes(CELEBA_NAMES, []), "no attribute")


# ---------------------------------------------------------------- the balanced sample


def sample_labels(n: int = 3000) -> tuple[torch.Tensor, torch.Tensor]:
    """Attributes with column 1 set for 30% of the images, and a partition of 80% train, 10% val, 10% test."""
    generator = torch.Generator().manual_seed(7)
    attributes = (torch.rand(n, 3, generator=generator) < torch.tensor([0.5, 0.3, 0.9])).long()
    partition = torch.tensor([0] * (n * 8 // 10) + [1] * (n // 10) + [2] * (n // 10), dtype=torch.int8)
    return attributes, partition[torch.randperm(n, generator=generator)]


def test_concepcion_sample_is_balanced_exact_and_from_the_right_partition():
    attributes, partition = sample_labels()
    sample = data.concepcion_sample(attributes, partition, column=1, sizes=(400, 101, 60), seed=3)
    for part, (name, size) in enumerate(zip(data.CELEBA_PARTS, (400, 101, 60))):
        index = sample[name]
        assert index.dtype == torch.int64 and len(index) == size and torch.equal(index, index.sort().values)
        assert (partition[index] == part).all()
        assert int(attributes[index, 1].sum()) == size // 2  # the odd one of 101 is without
    assert len(torch.cat(list(sample.values())).unique()) == 561  # no overlap
    again = data.concepcion_sample(attributes, partition, column=1, sizes=(400, 101, 60), seed=3)
    assert all(torch.equal(sample[k], again[k]) for k in sample)
    other = data.concepcion_sample(attributes, partition, column=1, sizes=(400, 101, 60), seed=4)
    assert not torch.equal(sample["train"], other["train"])


def test_concepcion_sample_too_big_says_how_many_there_are():
    attributes, partition = sample_labels()
    having = int(attributes[partition == 1, 1].sum())  # about 90 of the 300 val images
    one_line_error(
        lambda: data.concepcion_sample(attributes, partition, 1, sizes=(10, 2 * having + 2, 10)),
        "val partition",
        f"has {having} images with",
        "make the sample sizes smaller",
    )
    with pytest.raises(ValueError):
        data.concepcion_sample(attributes, partition, 1, sizes=(10, 10))


# ---------------------------------------------------------------- CelebA images


@pytest.mark.parametrize("images", ["folder", "zip", "nested zip"])
def test_load_celeba_reads_folder_and_zips_the_same(tmp_path, images, capsys):
    root = write_celeba(tmp_path / "celeba", images=images)
    faces = data.load_celeba(root, [11, 0, 5], size=(HEIGHT, WIDTH), cache_dir=tmp_path / "cache")
    assert isinstance(faces, data.AttributeFaces)
    assert faces.images.shape == (3, 3, HEIGHT, WIDTH) and faces.images.dtype == torch.uint8
    assert faces.files == ["000012.jpg", "000001.jpg", "000006.jpg"] and faces.columns == tuple(CELEBA_NAMES)
    assert faces.targets.tolist() == [[(v + 1) // 2 for v in CELEBA_VALUES[i]] for i in (11, 0, 5)]
    assert faces.partition.tolist() == [2, 0, 0]
    centre = faces.images[:, :, HEIGHT // 2, WIDTH // 2].float()
    assert torch.allclose(centre, torch.tensor([celeba_colour(i) for i in (11, 0, 5)], dtype=torch.float32), atol=6)
    assert "celeba: decoding 3 images at 20x16 into 2.9 kB" in capsys.readouterr().out


def test_load_celeba_skips_a_zip_member_declaring_a_bomb_size(tmp_path):
    root = write_celeba(tmp_path / "celeba", images="zip")
    content = bytearray((root / "img_align_celeba.zip").read_bytes())
    central = content.index(b"PK\x01\x02")  # the central directory, where each entry's sizes are declared
    entry = content.rindex(b"PK\x01\x02", 0, content.index(b"img_align_celeba/000002.jpg", central))
    content[entry + 24 : entry + 28] = (3_000_000_000).to_bytes(4, "little")  # its uncompressed size: 3 GB
    (root / "img_align_celeba.zip").write_bytes(bytes(content))
    with pytest.warns(UserWarning, match="skipped 1 zip members that would inflate .*: 000002.jpg"):
        faces = data.load_celeba(root, [0, 1, 2], size=(HEIGHT, WIDTH), cache_dir=tmp_path / "cache")
    assert faces.files == ["000001.jpg", "000003.jpg"]


def test_load_celeba_crops_and_sizes(tmp_path):
    root = write_celeba(tmp_path / "celeba")
    whole = data.load_celeba(root, [2, 3], size=(10, 8), cache_dir=tmp_path / "cache")
    square = data.load_celeba(root, [2, 3], size=8, crop="square", cache_dir=tmp_path / "cache")
    assert whole.images.shape == (2, 3, 10, 8) and square.images.shape == (2, 3, 8, 8)
    assert whole.images[:, :, 0].float().mean() > 200  # the white band is kept
    assert square.images[:, :, 0].float().mean() < 180  # the centre square leaves it out
    one_line_error(
        lambda: data.load_celeba(root, [1], crop="circle", cache_dir=tmp_path / "cache"), "'circle'", "none, square"
    )
    for size in [(0, 8), (8, 8, 3), "64", 8.0]:
        one_line_error(lambda: data.load_celeba(root, [1], size=size, cache_dir=tmp_path / "cache"), "image size")


def test_load_celeba_decodes_only_the_sample(tmp_path):
    root = write_celeba(tmp_path / "celeba")
    (root / "img_align_celeba/000004.jpg").write_bytes(b"not a JPEG")  # outside the sample: never opened
    (root / "img_align_celeba/000008.jpg").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        faces = data.load_celeba(root, [0, 1, 11], size=(HEIGHT, WIDTH), cache_dir=tmp_path / "cache")
    assert len(faces) == 3
    (root / "img_align_celeba/000002.jpg").write_bytes(b"not a JPEG either")
    with pytest.warns(UserWarning, match="skipped 2 missing or unreadable images: 000002.jpg, 000008.jpg"):
        faces = data.load_celeba(root, [0, 1, 7, 10], size=(HEIGHT, WIDTH), cache_dir=tmp_path / "cache")
    assert faces.files == ["000001.jpg", "000011.jpg"] and faces.partition.tolist() == [0, 2]
    assert faces.targets.tolist() == [[(v + 1) // 2 for v in CELEBA_VALUES[i]] for i in (0, 10)]
    with pytest.warns(UserWarning, match="skipped 1 missing or unreadable images: 000004.jpg"):
        one_line_error(lambda: data.load_celeba(root, [3], cache_dir=tmp_path / "cache"), "none of the 1 sampled")
    one_line_error(
        lambda: data.load_celeba(root, [12], cache_dir=tmp_path / "cache"), "positions up to 12", "lists 12 images"
    )


def test_load_celeba_refuses_what_memory_cannot_hold(tmp_path, monkeypatch):
    root = write_celeba(tmp_path / "celeba")
    monkeypatch.setattr(data, "_available_memory", lambda: 1_000_000_000)
    one_line_error(
        lambda: data.load_celeba(root, torch.arange(12).repeat(1100), cache_dir=tmp_path / "cache"),
        "13,200 images at 218x178 need 1.5 GB",
        "only 1.0 GB",
        "lower the sample sizes or the image size",
    )
    assert not (tmp_path / "cache").exists()


def test_load_celeba_comes_from_the_cache_the_second_time(tmp_path, monkeypatch, capsys):
    root = write_celeba(tmp_path / "celeba", images="zip")
    first = data.load_celeba(root, [4, 9], size=8, crop="square", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(data, "_decode_celeba", lambda *args: pytest.fail("decoded again instead of the cache"))
    capsys.readouterr()
    again = data.load_celeba(root, torch.tensor([4, 9]), size=8, crop="square", cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, first.images) and again.files == first.files and again.columns == first.columns
    assert capsys.readouterr().out == ""
    replace_line(root / "list_attr_celeba.txt", 5, "000003.jpg" + " 1" * 40)  # an edited list: read again
    monkeypatch.undo()
    assert data.load_celeba(root, [2], size=8, crop="square", cache_dir=tmp_path / "cache").targets.sum() == 40


def test_load_celeba_without_images_says_what_to_get(tmp_path):
    root = write_celeba(tmp_path / "celeba", images="zip")
    (root / "img_align_celeba.zip").write_bytes(b"PK not a zip")
    one_line_error(lambda: data.load_celeba(root, [1], cache_dir=tmp_path / "cache"), "not a readable zip file")
    (root / "img_align_celeba.zip").unlink()
    one_line_error(
        lambda: data.load_celeba(root, [1], cache_dir=tmp_path / "cache"),
        "no img_align_celeba/ folder",
        "img_align_celeba.zip",
    )


def test_attribute_faces_subset_keeps_the_fields_together():
    faces = data.synthetic_attribute_faces(10, size=8)
    part = faces.subset(torch.tensor([9, 2]))
    assert part.files == ["synthetic 9", "synthetic 2"] and part.partition.tolist() == [2, 0]
    assert torch.equal(part.targets, faces.targets[[9, 2]]) and len(part) == 2 and part.columns == faces.columns
    with pytest.raises(ValueError, match="differ in length"):
        data.AttributeFaces(faces.images, faces.targets[:3], faces.columns, faces.partition, faces.files)
    with pytest.raises(ValueError, match="one column per name"):
        data.AttributeFaces(faces.images, faces.targets, ("Male",), faces.partition, faces.files)


# ---------------------------------------------------------------- UTKFace

UTK_GOOD = {  # file name -> (gender, age, race)
    "1_1_2_20161219140603427.jpg.chip.jpg": (1, 1, 2),
    "26_0_1_20170116174525125.jpg.chip.jpg": (0, 26, 1),
    "70_1_4_20170109150557335.jpg": (1, 70, 4),  # an in-the-wild name
    "116_0_0_20170120134921760.jpg.chip.jpg": (0, 116, 0),
}
UTK_BAD = [
    "121_0_0_20170109142408075.jpg.chip.jpg",
    "30_2_0_20170109142408075.jpg.chip.jpg",
    "61_1_20170109142408075.jpg.chip.jpg",
]  # age over 120, gender 2, the race missing


def write_utkface(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(sorted(UTK_GOOD) + UTK_BAD):
        Image.new("RGB", (20, 20) if i else (30, 20), (40 * i, 50, 200 - 40 * i)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")  # ignored without a word, like the hidden ones
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "._26_0_1_20170116174525125.jpg.chip.jpg").write_bytes(b"resource fork")
    return folder


def test_utkface_reads_names_and_warns_once_about_bad_ones(tmp_path):
    folder = write_utkface(tmp_path / "crop_part1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        faces = data.load_utkface(folder, size=8, cache_dir=tmp_path / "cache")
    assert [str(w.message) for w in caught] == [
        "skipped 3 UTKFace files whose names are not <age>_<gender>_<race>_<date>: " + ", ".join(sorted(UTK_BAD))
    ]
    assert faces.files == sorted(UTK_GOOD) and faces.columns == ("gender", "age", "race")
    assert faces.targets.tolist() == [list(UTK_GOOD[name]) for name in sorted(UTK_GOOD)]
    assert faces.images.shape == (4, 3, 8, 8) and faces.partition.tolist() == [-1] * 4
    # the parent folder holding one folder of images reads the same, and comes from the cache
    with pytest.warns(UserWarning, match="skipped 3 UTKFace"):
        parent = data.load_utkface(tmp_path, size=8, cache_dir=tmp_path / "cache")
    assert torch.equal(parent.images, faces.images) and parent.files == faces.files


def test_utkface_comes_from_the_cache_and_still_warns(tmp_path, monkeypatch):
    folder = write_utkface(tmp_path / "UTKFace")
    with pytest.warns(UserWarning, match="skipped 3 UTKFace"):
        first = data.load_utkface(folder, size=8, cache_dir=tmp_path / "cache")
    monkeypatch.setattr(data, "_read_utkface", lambda *args: pytest.fail("decoded again instead of the cache"))
    with pytest.warns(UserWarning, match="skipped 3 UTKFace"):
        again = data.load_utkface(folder, size=8, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, first.images) and torch.equal(again.targets, first.targets)


def test_utkface_crops_faces_of_in_the_wild_photos(tmp_path, monkeypatch):
    folder = tmp_path / "wild"
    folder.mkdir()
    for name in ("30_1_3_20170101.jpg", "40_0_2_20170102.jpg"):
        Image.new("RGB", (60, 40), (200, 200, 200)).save(folder / name)
    monkeypatch.setattr(
        data, "detect_faces", lambda image, device="cpu": [(10, 5, 40, 35)] if image.size == (60, 40) else []
    )
    Image.new("RGB", (50, 50)).save(folder / "50_0_1_20170103.jpg")  # "no face" in it
    with pytest.warns(UserWarning, match="skipped 1 photos where no face was found: 50_0_1_20170103.jpg"):
        faces = data.load_utkface(folder, size=12, cache_dir=tmp_path / "cache", crop_faces=True)
    assert faces.images.shape == (2, 3, 12, 12) and faces.targets.tolist() == [[1, 30, 3], [0, 40, 2]]


def test_utkface_errors_say_what_is_expected(tmp_path):
    one_line_error(lambda: data.load_utkface(tmp_path / "nowhere"), "does not exist", "<age>_<gender>_<race>")
    (tmp_path / "empty").mkdir()
    one_line_error(lambda: data.load_utkface(tmp_path / "empty"), "no images", "<age>_<gender>_<race>")
    (tmp_path / "odd").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "odd/photo.jpg")
    one_line_error(lambda: data.load_utkface(tmp_path / "odd"), "none of the 1 images", "<age>_<gender>_<race>")
    one_line_error(lambda: data.load_utkface(tmp_path / "odd", size=0), "image size")
    (tmp_path / "two/a").mkdir(parents=True)
    (tmp_path / "two/b").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"two/{name}/20_0_0_1.jpg")
    one_line_error(lambda: data.load_utkface(tmp_path / "two"), "several folders of images (a, b)", "pass the one")


def test_age_groups_at_their_bounds():
    ages = torch.tensor([0, 12, 13, 19, 20, 39, 40, 59, 60, 116])
    assert data.age_group(ages).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert data.age_group_names() == ("0-12", "13-19", "20-39", "40-59", "60+")
    assert data.age_group(ages, (17,)).tolist() == [0] * 3 + [1] * 7 and data.age_group_names((17,)) == ("0-17", "18+")
    for bounds in [(12, 12), (0, 5), (19, 12), (12.5,), ()]:
        with pytest.raises(ValueError, match="increasing positive ints"):
            data.age_group(ages, bounds)


def utk_targets(n: int = 1000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    gender, age, race = (
        torch.randint(low, high, (n,), generator=generator) for low, high in ((0, 2), (1, 100), (0, 5))
    )
    return torch.stack([gender, age, race], 1)


def test_utkface_stratified_split_keeps_every_gender_and_age_group():
    targets = utk_targets()
    split = data.utkface_split(targets, seed=2)
    assert [len(split[k]) for k in ("train", "val", "test")] == [800, 0, 200]
    assert set(torch.cat([split["train"], split["test"]]).tolist()) == set(range(1000))
    strata = targets[:, 0] * 5 + data.age_group(targets[:, 1])
    for part, fraction in (("train", 0.8), ("test", 0.2)):
        counts, everything = strata[split[part]].bincount(minlength=10), strata.bincount(minlength=10)
        assert (counts > 0).all() and ((counts - fraction * everything).abs() <= 1).all(), counts
    assert torch.equal(split["test"], data.utkface_split(targets, seed=2)["test"])
    assert not torch.equal(split["test"], data.utkface_split(targets, seed=3)["test"])
    one_line_error(lambda: data.utkface_split(targets, "random"), "'random'", "stratified, utec")


def test_utkface_validation_comes_out_of_the_training_part_and_leaves_the_test_part_alone():
    targets = utk_targets()
    plain, split = data.utkface_split(targets, seed=2), data.utkface_split(targets, seed=2, val_fraction=0.25)
    assert torch.equal(split["test"], plain["test"]) and [len(split[k]) for k in ("train", "val")] == [600, 200]
    assert sorted(torch.cat([split["train"], split["val"]]).tolist()) == plain["train"].tolist()
    strata = targets[:, 0] * 5 + data.age_group(targets[:, 1])
    counts, trained = strata[split["val"]].bincount(minlength=10), strata[plain["train"]].bincount(minlength=10)
    assert (counts > 0).all() and ((counts - 0.25 * trained).abs() <= 1).all(), counts
    assert torch.equal(split["val"], data.utkface_split(targets, seed=2, val_fraction=0.25)["val"])
    one_line_error(lambda: data.utkface_split(targets, val_fraction=1.0), "validation share", "[0, 1)")


@pytest.mark.parametrize(
    "count, protocol, val_fraction, words",
    [
        (3, "stratified", 0.0, "the stratified split of 3 UTKFace images leaves 2 for train, 1 for test"),  # was unsaid
        (45, "stratified", 0.0, "leaves 36 for train, 9 for test"),
        (30, "utec", 0.0, "leaves 21 for train, 9 for test"),
        (100, "stratified", 0.1, "leaves 72 for train, 8 for val, 20 for test"),
    ],
)
def test_a_utkface_split_with_a_part_too_small_to_measure_is_one_line(count, protocol, val_fraction, words):
    one_line_error(
        lambda: data.utkface_split(utk_targets(count), protocol, val_fraction=val_fraction),
        words,
        "each part needs at least 10 images",
        "use more images",
    )


def test_the_smallest_utkface_splits_allowed():
    assert [len(part) for part in data.utkface_split(utk_targets(50)).values()] == [40, 0, 10]
    assert [len(part) for part in data.utkface_split(utk_targets(34), "utec").values()] == [24, 0, 10]


def test_utkface_utec_split_is_70_30_with_a_floor_per_class():
    targets = utk_targets()
    targets[:40, 0], targets[:40, 1] = 1, 80  # 40 + about 90 other old women; 3 old men only
    targets[40:43, 0], targets[40:43, 1] = 0, 70
    targets[43:, 1] = targets[43:, 1].clamp(max=59)
    split = data.utkface_split(targets, "utec")
    assert [len(split[k]) for k in ("train", "val", "test")] == [700, 0, 300]
    strata = targets[:, 0] * 5 + data.age_group(targets[:, 1])
    train, everything = strata[split["train"]].bincount(minlength=10), strata.bincount(minlength=10)
    assert all(train[c] >= min(50, n // 2) for c, n in enumerate(everything.tolist()))


# ---------------------------------------------------------------- synthetic attribute faces


def test_synthetic_attribute_faces_shapes_balance_and_determinism():
    faces = data.synthetic_attribute_faces(200, "celeba", size=16, seed=0)
    assert faces.images.shape == (200, 3, 16, 16) and faces.images.dtype == torch.uint8
    assert faces.columns == ("Male", "Eyeglasses", "Smiling") and faces.targets.dtype == torch.int64
    assert faces.targets.sum(0).tolist() == [100, 100, 100]
    assert faces.partition.tolist() == [0] * 160 + [1] * 20 + [2] * 20
    assert torch.equal(faces.images, data.synthetic_attribute_faces(200, "celeba", size=16, seed=0).images)
    assert not torch.equal(faces.images, data.synthetic_attribute_faces(200, "celeba", size=16, seed=1).images)
    assert (faces.images[:, 0].float() - faces.images[:, 2].float()).abs().mean() > 10  # colour, not gray
    ages = data.synthetic_attribute_faces(200, "utkface", size=16, seed=0)
    assert ages.columns == ("gender", "age", "race") and ages.partition.tolist() == [-1] * 200
    assert ages.targets[:, 0].sum() == 100 and ages.targets[:, 1].min() >= 1 and ages.targets[:, 1].max() <= 90
    assert set(ages.targets[:, 2].tolist()) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError, match="'fer'"):
        data.synthetic_attribute_faces(10, "fer")


def logistic_accuracy(pixels: torch.Tensor, labels: torch.Tensor, train: torch.Tensor) -> float:
    """Held-out accuracy of an L2-regularised logistic regression on standardised pixels."""
    pixels = (pixels - pixels[train].mean(0)) / (pixels[train].std(0) + 1e-6)
    weights = torch.zeros(pixels.shape[1] + 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], max_iter=40)
    features = torch.cat([pixels, torch.ones(len(pixels), 1)], 1)

    def loss():
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(features[train] @ weights, labels[train].float())
        value = value + 1e-2 * weights.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return float(((features[~train] @ weights > 0) == labels[~train].bool()).float().mean())


@pytest.mark.parametrize("task,columns", [("celeba", ("Male", "Eyeglasses", "Smiling")), ("utkface", ("gender",))])
def test_synthetic_attributes_are_learnable_from_pixels(task, columns):
    torch.manual_seed(0)
    faces = data.synthetic_attribute_faces(1500, task, size=24, seed=0)
    pixels, train = faces.images.flatten(1).float() / 255, torch.arange(1500) < 1200
    for name in columns:
        accuracy = logistic_accuracy(pixels, faces.targets[:, faces.columns.index(name)], train)
        assert accuracy > 0.8, (name, accuracy)


# ---------------------------------------------------------------- the real data (FACENETS_DATA)


def test_real_utkface_counts_and_malformed_names(tmp_path):
    root = Path(os.environ.get("FACENETS_DATA", "/nonexistent")) / "utkface"
    if not root.is_dir():
        pytest.skip("set FACENETS_DATA to the folder holding utkface/ to test on the real data")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        faces = data.load_utkface(root, size=32, cache_dir=tmp_path)
    assert [str(w.message) for w in caught] == [
        "skipped 2 UTKFace files whose names are not <age>_<gender>_<race>_<date>: "
        "61_1_20170109142408075.jpg.chip.jpg, 61_3_20170109150557335.jpg.chip.jpg"
    ]
    assert len(faces) == 9778 and faces.images.shape == (9778, 3, 32, 32)
    assert faces.targets[:, 1].min() >= 1 and faces.targets[:, 1].max() <= 116
    split = data.utkface_split(faces.targets)
    assert (len(split["train"]), len(split["test"])) == (7822, 1956)
