"""Face image data: readers, splits, a decode cache, synthetic faces and MTCNN face crops.

Formats read:
  * FER-2013 as the Kaggle image folders: root/train/<class>/Training_<id>.jpg, root/test/<class>/PublicTest_<id>.jpg
  * the same folders straight from the Kaggle download .zip, without extracting it
  * the original fer2013.csv (emotion,pixels,Usage) and icml_face_data.csv (emotion, Usage, pixels)
  * any folder of photos root/<class>/*, cropped to the biggest face with MTCNN (facenet-pytorch)
  * CelebA in its official layout: root/list_attr_celeba.txt, root/list_eval_partition.txt and the images in
    root/img_align_celeba/*.jpg or root/img_align_celeba.zip (read without extracting it); also Kaggle's
    list_attr_celeba.csv and list_eval_partition.csv in place of the .txt files
  * UTKFace: a folder of <age>_<gender>_<race>_<datetime>.jpg[.chip.jpg] (the aligned crops, or in-the-wild
    photos cropped to the biggest face with MTCNN), or the folder above one such folder
  * face images without labels, for GANs: any folder of images, read with its subfolders (CelebA's
    img_align_celeba/ among them), or a .zip of them; non-square images lose their edges to a centre square

The emotion readers return FaceImages: one uint8 tensor [N, C, H, W] with the label, the FER-2013 Usage and the
source name of each image. The attribute readers return AttributeFaces: RGB images with several labels each
(CelebA's 40 attributes; UTKFace's gender, age and race) and CelebA's official partition. load_face_images returns
UnlabelledFaces: RGB images and their file names, for a GAN. load_fer2013,
face_folders, load_celeba, load_utkface and load_face_images keep the decoded tensors in a cache, so the second load
of the 32k
FER-2013 images takes a fraction of a second instead of decoding 32k JPEGs again. CelebA is read in two steps:
read_celeba_labels first (no image decoded), then load_celeba decodes only the sample drawn from the labels.
Input the user can fix raises DataError (one line: the problem and what to do). Problems that cost only a
few images (corrupt files, photos without a face) skip them and warn with a count and the first few names.
"""

from __future__ import annotations

import csv
import difflib
import functools
import hashlib
import io
import os
import textwrap
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # fer2013.csv's label ids 0..6
USAGES = ("Training", "PublicTest", "PrivateTest", "Test")  # "Test": from test/ with no Usage prefix in its name
SPLITS = ("official", "publictest", "monterrey", "udine", "utec")

# Some Kaggle copies of FER-2013 name three folders with adjectives.
EMOTION_ALIASES = {"disgusted": "disgust", "fearful": "fear", "surprised": "surprise"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
FER_SIZE = 48
FER_PIXELS = FER_SIZE * FER_SIZE
CACHE_VERSION = 1  # bump when decoding or the cached layout changes, so that old caches are not reused
GET_FER2013 = 'download the Kaggle "FER-2013" image folders (train/, test/) or the original fer2013.csv'
# PIL raises OSError (UnidentifiedImageError, truncated file) or ValueError for a bad image, and
# DecompressionBombError for one of over ~179 megapixels (which could exhaust memory); a damaged zip member
# raises BadZipFile (bad CRC) or zlib.error before PIL sees it.
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError, zipfile.BadZipFile, zlib.error)


class DataError(Exception):
    """Bad input the user can fix. str(e) is ONE line naming the problem and what to do; scripts print it and exit 2."""


@dataclass
class FaceImages:
    """Decoded images with one label, Usage and source name each."""

    images: torch.Tensor  # uint8 [N, C, H, W] (C=1 for FER2013)
    labels: torch.Tensor  # int64 [N]
    usage: torch.Tensor  # int8 [N], index into USAGES
    files: list[str]  # source name of each image (relative path or "csv row 17"), for messages
    classes: tuple[str, ...]

    def __post_init__(self):
        # Catches a damaged cache as well as a reader bug: every field must describe the same N images.
        if not len(self.images) == len(self.labels) == len(self.usage) == len(self.files):
            raise ValueError(
                f"FaceImages fields differ in length: {len(self.images)} images, "
                f"{len(self.labels)} labels, {len(self.usage)} usages, {len(self.files)} files"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> FaceImages:
        """The images at index (an int64 index tensor), in that order."""
        return FaceImages(
            self.images[index],
            self.labels[index],
            self.usage[index],
            [self.files[i] for i in index.tolist()],
            self.classes,
        )


@dataclass
class AttributeFaces:
    """Decoded face images with several labels each (one column per attribute or per target)."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    targets: torch.Tensor  # int64 [N, K], one column per name in columns
    columns: tuple[str, ...]  # CelebA: attribute names, values 0/1; UTKFace: ("gender", "age", "race")
    partition: torch.Tensor  # int8 [N]: 0 train, 1 val, 2 test as in CelebA's list_eval_partition; -1 where none
    files: list[str]  # source name of each image, for messages

    def __post_init__(self):
        # Catches a damaged cache as well as a reader bug: every field must describe the same N images.
        if not len(self.images) == len(self.targets) == len(self.partition) == len(self.files):
            raise ValueError(
                f"AttributeFaces fields differ in length: {len(self.images)} images, "
                f"{len(self.targets)} targets, {len(self.partition)} partitions, {len(self.files)} files"
            )
        if self.targets.dim() != 2 or self.targets.shape[1] != len(self.columns):
            raise ValueError(
                f"AttributeFaces targets have shape {tuple(self.targets.shape)}, expected "
                f"[N, {len(self.columns)}]: one column per name in columns"
            )

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: torch.Tensor) -> AttributeFaces:
        """The images at index (an int64 index tensor), in that order."""
        return AttributeFaces(
            self.images[index],
            self.targets[index],
            self.columns,
            self.partition[index],
            [self.files[i] for i in index.tolist()],
        )


def _first_few(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _warn_skipped(names: list[str], what: str) -> None:
    if names:
        warnings.warn(f"skipped {len(names)} {what}: {_first_few(names)}")


def _existing(path: str | Path, how_to_get: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist: {how_to_get}, and pass its path")
    return path


def _cannot_read(path: Path, error: OSError) -> DataError:
    return DataError(
        f"{path} cannot be read ({error.strerror or type(error).__name__}): check its permissions "
        f"(ls -ld {path}), or pass a copy you may read"
    )


def _entries(folder: Path) -> list[Path]:
    """The entries of folder, sorted; DataError when it cannot be listed (no read permission)."""
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        raise _cannot_read(folder, error) from None


def _shown(fields: Sequence[str], separator: str = ",", width: int = 60) -> str:
    """A header or line as found, quoted, cut to about width characters (with its field count when cut)."""
    text = separator.join(fields)
    return repr(text) if len(text) <= width else f"{text[:width]!r}... ({len(fields)} fields)"


def _eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (a 16-bit PNG opens as mode I;16 or I) scaled to 8-bit L, 0..65535 onto 0..255;
    other images as they are. convert("L") or ("RGB") would clip every value above 255: 99.6% of a gradient white."""
    if image.mode not in ("I;16", "I;16L", "I;16B", "I"):
        return image
    values = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L")  # rounded to the nearest level


# ---------------------------------------------------------------- FER-2013 readers


def _fer_layout(names: Iterable[str]) -> list[str]:
    """The names that sit at [top/]<train|test>/<class>/<image>, train first, each part sorted for determinism."""
    keep = []
    for name in names:
        parts = PurePosixPath(name).parts
        # macOS adds .DS_Store, ._<name> copies and, in zips, __MACOSX/: none of them are images.
        if (
            len(parts) in (3, 4)
            and parts[-3].lower() in ("train", "test")
            and parts[-1].lower().endswith(IMAGE_SUFFIXES)
            and not any(part.startswith(".") or part == "__MACOSX" for part in parts)
        ):
            keep.append(name)
    return sorted(keep, key=lambda name: (PurePosixPath(name).parts[-3].lower() != "train", name))


def _emotion_id(folder: str, shown: str, where: Path) -> int:
    name = folder.lower()
    name = EMOTION_ALIASES.get(name, name)
    if name not in EMOTIONS:
        raise DataError(
            f"unknown class folder '{shown}' in {where}: rename it to one of "
            f"{', '.join(EMOTIONS + tuple(EMOTION_ALIASES))} or remove it"
        )
    return EMOTIONS.index(name)


def _usage_id(file_name: str, split: str) -> int:
    for usage in USAGES[:3]:
        if file_name.startswith(usage + "_"):
            return USAGES.index(usage)
    return USAGES.index("Training" if split.lower() == "train" else "Test")


def _decode_fer(names: list[str], open_image: Callable[[str], Image.Image]) -> tuple[torch.Tensor, list[int]]:
    """Decode to uint8 [N, 1, 48, 48]. Returns the images and the positions in names that could be read."""
    pixels = np.empty((len(names), FER_SIZE, FER_SIZE), np.uint8)
    kept, unreadable, oversized, converted = [], [], [], []
    for i, name in enumerate(names):
        try:
            with open_image(name) as opened:
                image = _eight_bit(opened)
                odd = image.mode != "L" or image.size != (FER_SIZE, FER_SIZE)
                if odd:
                    image = image.convert("L").resize((FER_SIZE, FER_SIZE), Image.BILINEAR)
                pixels[len(kept)] = np.asarray(image)  # decodes here, so a truncated file fails inside the try
        except UNREADABLE as error:
            (oversized if isinstance(error, ZipMemberTooBig) else unreadable).append(name)
            continue
        kept.append(i)
        if odd:
            converted.append(name)
    _warn_skipped(unreadable, "unreadable images")
    _warn_oversized(oversized)
    if converted:
        warnings.warn(
            f"converted {len(converted)} images that were not 48x48 grayscale to 48x48 grayscale: "
            f"{_first_few(converted)}"
        )
    return torch.from_numpy(pixels[: len(kept)]).unsqueeze(1), kept


def _read_fer_layout(names: list[str], open_image: Callable[[str], Image.Image], where: Path) -> FaceImages:
    if not names:
        raise DataError(
            f"no images (.jpg, .jpeg, .png) in {where} under train/<class>/ or test/<class>/: {GET_FER2013}"
        )
    labels, usage = [], []
    for name in names:
        split, folder, file_name = PurePosixPath(name).parts[-3:]
        labels.append(_emotion_id(folder, f"{split}/{folder}", where))
        usage.append(_usage_id(file_name, split))
    images, kept = _decode_fer(names, open_image)
    if not kept:
        raise DataError(f"none of the {len(names)} images in {where} could be read: {GET_FER2013} again")
    return FaceImages(
        images,
        torch.tensor(labels)[kept],
        torch.tensor(usage, dtype=torch.int8)[kept],
        [names[i] for i in kept],
        EMOTIONS,
    )


def fer2013_folders(root: str | Path) -> FaceImages:
    """Read the Kaggle FER-2013 image folders root/train/<class>/* and root/test/<class>/*."""
    root = _existing(root, GET_FER2013)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass the folder that holds train/ and test/")
    # Listed by hand, not globbed: glob passes over a folder it may not read, and a class would vanish unsaid.
    names = _fer_layout(
        f"{split.name}/{folder.name}/{file.name}"
        for split in _entries(root)
        if split.name.lower() in ("train", "test") and split.is_dir()
        for folder in _entries(split)
        if folder.is_dir()
        for file in _entries(folder)
    )
    return _read_fer_layout(names, lambda name: Image.open(root / name), root)


def _open_zip(path: Path, or_else: str) -> zipfile.ZipFile:
    """path as an open ZipFile; a damaged or foreign file is a DataError ending with or_else (what else to do)."""
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise DataError(f"{path} is not a readable zip file: download it again, or {or_else}") from None
    except OSError as error:  # no read permission, a disk error
        raise _cannot_read(path, error) from None


# A zip member is inflated only when its declared size is within both bounds (zipfile then inflates no more than
# that size), so that a zip bomb is skipped before it fills memory: one member inflating to 3 GB took 7.2 GB.
ZIP_MEMBER_MAX_BYTES = 100_000_000  # a face photo is far smaller: a 24-megapixel JPEG takes about 10 MB
ZIP_MAX_RATIO = 100  # deflate packs JPEG faces 1.00-1.06x (300 each of fer2013, utkface, celeba-faces): 100x is no face


class ZipMemberTooBig(ValueError):
    """A zip member whose declared size is beyond the bounds above; it is skipped without being inflated."""


def _zip_image(archive: zipfile.ZipFile, name: str) -> Image.Image:
    """The image in the zip member name, inflated only if its declared size is within the bounds (members up to
    1 MB may shrink more than ZIP_MAX_RATIO: a flat-coloured image does)."""
    member = archive.getinfo(name)
    if member.file_size > min(ZIP_MEMBER_MAX_BYTES, max(1 << 20, ZIP_MAX_RATIO * member.compress_size)):
        raise ZipMemberTooBig(name)
    with archive.open(member) as file:
        return Image.open(io.BytesIO(file.read(member.file_size)))  # read(n) inflates about n bytes at most


def _warn_oversized(names: list[str]) -> None:
    _warn_skipped(
        names,
        f"zip members that would inflate to over {_bytes_text(ZIP_MEMBER_MAX_BYTES)} or to over "
        f"{ZIP_MAX_RATIO}x their packed size, too much for a face image (a zip bomb?)",
    )


def fer2013_zip(path: str | Path) -> FaceImages:
    """Read the FER-2013 image folders straight from the Kaggle .zip (optionally under one top-level folder)."""
    path = _existing(path, GET_FER2013)
    with _open_zip(path, "unzip it and pass the folder") as archive:
        names = _fer_layout(archive.namelist())
        return _read_fer_layout(names, lambda name: _zip_image(archive, name), path)


def fer2013_csv(path: str | Path) -> FaceImages:
    """Read fer2013.csv (emotion,pixels,Usage) or icml_face_data.csv (emotion, Usage, pixels); files are "csv row N".

    Rows are numbered as in a spreadsheet or an editor: the header is row 1.
    """
    path = _existing(path, GET_FER2013)
    labels, usage, pixels, files = [], [], [], []
    try:
        file = path.open(newline="", encoding="utf-8-sig")  # -sig: a spreadsheet may have added a BOM
    except OSError as error:
        raise _cannot_read(path, error) from None
    try:
        with file:
            rows = csv.reader(file)
            header = next(rows, None)
            if header is None:
                raise DataError(f"{path} is empty: pass fer2013.csv or icml_face_data.csv (download it again)")
            columns = [name.strip().lower() for name in header]
            if sorted(columns) != ["emotion", "pixels", "usage"]:
                raise DataError(
                    f"{path.name} has the header {_shown(header)}, expected the columns emotion, pixels, "
                    f"Usage (any order): pass fer2013.csv or icml_face_data.csv"
                )
            label_at, pixels_at, usage_at = (columns.index(name) for name in ("emotion", "pixels", "usage"))
            label_ids = {str(i) for i in range(len(EMOTIONS))}
            for row in rows:
                if not row:  # blank line, e.g. at the end of the file
                    continue
                where = f"{path.name} row {rows.line_num}"
                if len(row) != 3:
                    raise DataError(
                        f"{where} has {len(row)} fields, expected 3 (emotion, pixels, Usage): fix or delete it"
                    )
                label = row[label_at].strip()
                if label not in label_ids:
                    raise DataError(
                        f"{where}: emotion {label!r} is not a label id 0-6 ({', '.join(EMOTIONS)}): fix or delete it"
                    )
                try:  # numpy's C parser: about 2 s for the 35,887 rows, where str.split is 4x slower
                    values = np.fromstring(row[pixels_at], dtype=np.int32, sep=" ")
                except ValueError:  # numpy >= 2; older numpy stops at the text, and the size check below catches it
                    raise DataError(
                        f"{where} has text that is not a number among its pixels: fix or delete it"
                    ) from None
                if values.size != FER_PIXELS:
                    raise DataError(
                        f"{where} has {values.size} pixel values, expected {FER_PIXELS} (48x48) "
                        f"separated by spaces: fix or delete it"
                    )
                if values.min() < 0 or values.max() > 255:
                    raise DataError(f"{where} has pixel values outside 0-255: fix or delete it")
                name = row[usage_at].strip()
                if name not in USAGES[:3]:
                    raise DataError(
                        f"{where}: Usage {name!r} is not Training, PublicTest or PrivateTest: fix or delete it"
                    )
                labels.append(int(label))
                usage.append(USAGES.index(name))
                pixels.append(values.astype(np.uint8))
                files.append(f"csv row {rows.line_num}")
    except (UnicodeDecodeError, csv.Error) as e:  # e.g. a binary file named .csv
        raise DataError(
            f"{path.name} is not a readable csv text file ({textwrap.shorten(str(e), 60)}): "
            "pass fer2013.csv or icml_face_data.csv"
        ) from None
    if not files:
        raise DataError(f"{path.name} has no data rows: {GET_FER2013} again")
    images = torch.from_numpy(np.stack(pixels).reshape(-1, 1, FER_SIZE, FER_SIZE))
    return FaceImages(images, torch.tensor(labels), torch.tensor(usage, dtype=torch.int8), files, EMOTIONS)


def read_fer2013(path: str | Path) -> FaceImages:
    """Read FER-2013 from image folders, the Kaggle .zip or a .csv, chosen by what path is."""
    path = _existing(path, GET_FER2013)
    if path.is_dir():
        return fer2013_folders(path)
    if path.suffix.lower() == ".zip":
        return fer2013_zip(path)
    if path.suffix.lower() == ".csv":
        return fer2013_csv(path)
    raise DataError(
        f"{path} is not a folder, a .zip or a .csv: pass the FER-2013 image folder, the Kaggle .zip or fer2013.csv"
    )


# ---------------------------------------------------------------- decode cache


def _fingerprint(path: Path) -> list:
    """What changes when the data changes: a file's size and mtime; for a folder, those of every folder up to
    two levels down with its entry count (adding, removing or renaming a file changes its folder's mtime)."""
    if path.is_file():
        return [path.stat().st_size, path.stat().st_mtime_ns]

    def listing(folder: Path) -> list[Path]:  # [] for a folder that cannot be read: the readers skip it or say so
        try:
            return list(folder.iterdir())
        except OSError:
            return []

    folders, level = [], [path]
    for _ in range(2):
        level = [entry for folder in level for entry in listing(folder) if entry.is_dir()]
        folders += level
    return [(str(folder), len(listing(folder)), folder.stat().st_mtime_ns) for folder in [path, *sorted(folders)]]


def cache_folder(cache_dir=None) -> Path:
    """Where decoded data sets are kept: cache_dir, else $FACENETS_CACHE, else ~/.cache/facenets."""
    return Path(cache_dir or os.environ.get("FACENETS_CACHE") or Path.home() / ".cache" / "facenets").expanduser()


def _cached(
    kind: str,
    path: Path,
    settings: tuple,
    cache_dir: str | Path | None,
    read: Callable[[], FaceImages | AttributeFaces],
    container: type[FaceImages | AttributeFaces] = FaceImages,
) -> FaceImages | AttributeFaces:
    """read() once; later calls load its result from cache_dir while path and settings are unchanged.

    container is the class read() returns, which the cache rebuilds; kind keeps the caches of the classes apart.
    """
    path = path.resolve()
    key = repr((CACHE_VERSION, kind, str(path), settings, _fingerprint(path)))
    cache = cache_folder(cache_dir) / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if cache.exists():
        try:
            return container(**torch.load(cache, weights_only=True))
        except Exception as error:  # any damage (truncated, foreign or hand-edited file) only means: decode again
            warnings.warn(f"ignoring the damaged cache {cache} ({type(error).__name__}); decoding the data again")
    data = read()
    # Written under a temporary name, then renamed: a run killed while saving never leaves a half-written cache,
    # and the process id keeps two runs started together from writing into the same temporary file.
    temporary = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(vars(data), temporary)  # a dict of tensors, a list and a tuple of str: safe for weights_only
        os.replace(temporary, cache)
    except (OSError, RuntimeError) as error:
        reason = (
            error.strerror
            if isinstance(error, OSError) and error.strerror
            else str(error).strip().splitlines()[0][:100]
        )
        warnings.warn(f"could not write the cache {cache} ({reason}); set FACENETS_CACHE to a writable folder")
    finally:  # also after Ctrl-C or a full disk: no half-written file is left behind
        if temporary.exists():
            temporary.unlink()
    _remove_orphans(cache)
    return data


def _remove_orphans(cache: Path) -> None:
    """Delete the temporary files of cache left by processes killed with -9 (no finally runs then): ~80 MB each."""
    for orphan in cache.parent.glob(f"{cache.name}.*.tmp"):
        try:
            os.kill(int(orphan.suffixes[-2][1:]), 0)  # raises if no process has that id any more
        except ProcessLookupError:
            orphan.unlink(missing_ok=True)
        except (ValueError, IndexError, OSError):  # not ours, or a process of another user: leave it
            pass


def load_fer2013(path: str | Path, cache_dir: str | Path | None = None) -> FaceImages:
    """read_fer2013(path), decoded once, then loaded from cache_dir (default $FACENETS_CACHE or ~/.cache/facenets)."""
    path = _existing(path, GET_FER2013)
    return _cached("fer2013", path, (), cache_dir, lambda: read_fer2013(path))


# ---------------------------------------------------------------- splits


def stratified_split(
    labels: torch.Tensor, fractions: list[float], seed: int, min_per_class: int = 0
) -> list[torch.Tensor]:
    """Seeded split of the positions 0..N-1 into parts of round(fraction * N), each class in proportion.

    Every part holds its fraction of every class to within one image. Fractions sum to at most 1; the rest is
    left out. With min_per_class the first part holds at least min(min_per_class, n // 2) of each class of n
    images (at most half, so that the other parts keep some of every class). Each part is sorted.
    """
    if any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
        raise ValueError(f"fractions must be >= 0 and sum to at most 1, got {fractions}")
    labels = labels.cpu()
    shuffled = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    # Give each image its quantile within its class in shuffled order, sort by it and cut the sorted list:
    # every cut then holds the same share of every class, and the part sizes are exact.
    quantile = torch.empty(len(labels), dtype=torch.float64)
    for label in labels.unique():
        members = shuffled[labels[shuffled] == label]
        share = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
        share[: min(min_per_class, len(members) // 2)] -= 1  # sorts before every other image, into the first part
        quantile[members] = share
    order = shuffled[quantile[shuffled].sort(stable=True).indices]  # ties in shuffled order: no class goes first
    ends = [round(sum(fractions[: i + 1]) * len(labels)) for i in range(len(fractions))]
    return [order[start:end].sort().values for start, end in zip([0] + ends, ends)]


def split_indices(
    data: FaceImages, protocol: str = "official", val_fraction: float = 0.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Indices "train", "val" (maybe empty) and "test" of one of the report protocols in SPLITS.

    official    train = Training images, less a stratified val_fraction of them as val; test = all the others
    publictest  train = Training, val = PublicTest, test = PrivateTest
    monterrey   Tec de Monterrey: of Training, 20,099/28,709 train and 2,151/28,709 val (stratified);
                test = all the others
    udine       Udine: all images pooled, stratified 70% train, 15% val, 15% test
    utec        UTEC: all images pooled, stratified 70% train, 30% test, no val; at least min(50, n // 2) of
                each class of n images in train (stratifying gives 70% already: the floor guards rounding)
    val_fraction is used only by official: the other protocols fix their own parts. Test never feeds model selection.
    """
    if protocol not in SPLITS:
        raise DataError(f"unknown split protocol {protocol!r}: choose one of {', '.join(SPLITS)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), got {val_fraction}")

    def having(usage: str) -> torch.Tensor:
        return (data.usage == USAGES.index(usage)).nonzero().flatten()

    def stratified(pool: torch.Tensor, fractions: list[float], min_per_class: int = 0) -> list[torch.Tensor]:
        return [pool[part] for part in stratified_split(data.labels[pool], fractions, seed, min_per_class)]

    training, everything = having("Training"), torch.arange(len(data))
    not_training = (data.usage != USAGES.index("Training")).nonzero().flatten()
    if protocol == "official":
        train, val = stratified(training, [1 - val_fraction, val_fraction])
        test = not_training
    elif protocol == "publictest":
        train, val, test = training, having("PublicTest"), having("PrivateTest")
        if len(test) == 0:
            raise DataError(
                "this copy of FER-2013 has no PrivateTest images (only the PublicTest half of the test "
                "set): use --split official"
            )
    elif protocol == "monterrey":
        train, val = stratified(training, [20099 / 28709, 2151 / 28709])
        test = not_training
    elif protocol == "udine":
        train, val, test = stratified(everything, [0.70, 0.15, 0.15])
    else:
        train, test = stratified(everything, [0.70, 0.30], min_per_class=50)
        val = torch.zeros(0, dtype=torch.int64)
    if len(train) == 0:
        raise DataError(
            f"split {protocol} leaves no training images: the data has no Training images "
            f"(check the train/ folder or the csv's Usage column), or use --split udine or utec"
        )
    return {"train": train, "val": val, "test": test}


# ---------------------------------------------------------------- synthetic faces

# One row per emotion, in EMOTIONS order: how each expression bends the cartoon face.
#   curve: mouth corners up (+) or down (-)   open: mouth opening   tilt: one mouth corner higher (asymmetry)
#   width: mouth half-width   brow_tilt: inner brow ends down (+) or up (-)   brow_up: brows raised   eyes: eye opening
_EXPRESSIONS = torch.tensor(
    [
        # curve  open  tilt  width brow_tilt brow_up eyes
        [-0.06, 0.00, 0.00, 0.20, 0.18, -0.04, 0.5],  # angry: brows down inside, narrow eyes, pressed mouth
        [-0.08, 0.02, 0.20, 0.22, 0.05, 0.00, 0.4],  # disgust: crooked mouth, squint
        [0.00, 0.09, 0.00, 0.28, -0.08, 0.10, 1.5],  # fear: wide eyes, flat open mouth, brows up inside
        [0.16, 0.02, 0.00, 0.28, 0.00, 0.00, 0.9],  # happy: smile
        [-0.16, 0.00, 0.00, 0.22, -0.12, 0.02, 0.8],  # sad: frown, brows up inside
        [0.00, 0.18, 0.00, 0.12, 0.00, 0.14, 1.5],  # surprise: round open mouth, raised brows, wide eyes
        [0.00, 0.00, 0.00, 0.22, 0.00, 0.00, 1.0],  # neutral
    ]
)


def _inside(distance: torch.Tensor, pixel: float) -> torch.Tensor:
    """1 inside a shape (distance < 0), 0 outside, with an edge one pixel soft so small shapes do not flicker."""
    return torch.sigmoid(-distance / pixel)


def _draw_faces(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Cartoon faces showing the emotions labels, as floats in [0, 1] of shape [len(labels), size, size]."""
    n = len(labels)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, 1, 1, generator=generator)

    strength = uniform(0.7, 1.3)
    curve, mouth_open, tilt, width, brow_tilt, brow_up, eyes = (
        column.view(n, 1, 1) for column in _EXPRESSIONS[labels].T
    )
    curve, mouth_open, tilt, brow_tilt, brow_up = (v * strength for v in (curve, mouth_open, tilt, brow_tilt, brow_up))
    # Face coordinates: the face is an oval about 1.4 wide and 1.8 tall around (0, 0); y grows downwards.
    axis = torch.linspace(-1, 1, size)
    scale = uniform(0.8, 1.0)
    x = (axis.view(1, 1, size) - uniform(-0.065, 0.065)) / scale
    y = (axis.view(1, size, 1) - uniform(-0.065, 0.065)) / scale
    pixel = 2 / size / scale  # one pixel in face coordinates
    face = _inside((torch.sqrt((x / 0.7) ** 2 + (y / 0.9) ** 2) - 1) * 0.7, pixel)
    side = x.abs()  # both eyes and brows at once: mirror the left half onto the right
    eye = _inside((torch.sqrt(((side - 0.3) / 0.12) ** 2 + ((y + 0.15) / (0.08 * eyes)) ** 2) - 1) * 0.08, pixel)
    brow_y = -0.38 - brow_up + brow_tilt * (0.3 - side) / 0.14  # inner end (side 0.16) moves by brow_tilt
    brow = _inside(torch.maximum((y - brow_y).abs() - 0.05, (side - 0.3).abs() - 0.14), pixel)
    along = (x / width).clamp(-1, 1)  # -1..1 from one mouth corner to the other
    mouth_y = 0.45 + curve * (1 - 2 * along**2) + tilt * along
    mouth_half_height = 0.045 + mouth_open * (1 - along**2)
    mouth = _inside(torch.maximum((y - mouth_y).abs() - mouth_half_height, x.abs() - width), pixel)
    features = torch.maximum(torch.maximum(eye, brow), mouth) * face
    background, skin, ink = uniform(0.05, 0.45), uniform(0.55, 0.85), uniform(0.35, 0.5)
    image = background + (skin - background) * face - ink * features
    image = (image - 0.5) * uniform(0.7, 1.3) + 0.5 + uniform(-0.1, 0.1)  # contrast, brightness
    image = image + 0.05 * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 1)


def synthetic_faces(n: int = 2000, size: int = 48, seed: int = 0, test_fraction: float = 0.2) -> FaceImages:
    """Deterministic grayscale cartoon faces, balanced over EMOTIONS, for demos and tests (no download).

    Each class has its own mouth, brows and eyes; position, scale, expression strength, brightness, contrast and
    noise vary per face, so a classifier must learn the features. The first (1 - test_fraction) of the faces
    are "Training", the rest "PublicTest".
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(EMOTIONS)  # periodic, so both the Training and the PublicTest part are balanced
    # A few hundred faces at a time: the tensors then stay in the CPU cache, which is several times faster.
    image = torch.cat([_draw_faces(part, size, generator) for part in labels.split(256)])
    images = (image * 255).round().to(torch.uint8).unsqueeze(1)
    usage = torch.full((n,), USAGES.index("PublicTest"), dtype=torch.int8)
    usage[: round((1 - test_fraction) * n)] = USAGES.index("Training")
    return FaceImages(images, labels, usage, [f"synthetic {i}" for i in range(n)], EMOTIONS)


# ---------------------------------------------------------------- MTCNN face crops


@functools.lru_cache(maxsize=None)
def _mtcnn(device: str):
    # Imported here: facenet-pytorch is needed only for photos, and some machines (the GPU one) lack it.
    try:
        from facenet_pytorch import MTCNN
    except ImportError:
        raise DataError("facenet-pytorch is not installed: pip install facenet-pytorch") from None
    return MTCNN(keep_all=True, device=device)  # its weights ship inside the package: nothing to download


def open_photo(path: str | Path) -> Image.Image:
    """A photo as RGB, turned upright by its EXIF orientation (phones often store photos sideways)."""
    with Image.open(path) as stored:
        return _eight_bit(ImageOps.exif_transpose(stored)).convert("RGB")


def detect_faces(image: Image.Image, device: str = "cpu") -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1) of the faces MTCNN finds in image, biggest first; [] when there is none."""
    if min(image.size) < 20:  # smaller than MTCNN's smallest face (min_face_size=20), on which its detect fails
        return []
    boxes, _ = _mtcnn(str(device)).detect(image.convert("RGB"))
    if boxes is None:
        return []
    found = [tuple(float(v) for v in box) for box in boxes]
    return sorted(found, key=lambda box: (box[2] - box[0]) * (box[3] - box[1]), reverse=True)


def crop_face(
    image: Image.Image,
    box: tuple[float, float, float, float],
    size: int | tuple[int, int] = 48,
    grayscale: bool = True,
    margin: float = 0.1,
    inside: bool = False,
) -> torch.Tensor:
    """The region around box, widened by margin (a fraction of the box) on each side, as uint8 [C, height, width].

    size is one int for a square, or (height, width); the region has that shape, so the face is not stretched.
    Parts beyond the photo's edge are black; with inside, the region is first shrunk to fit the photo and moved
    into it, so that a photo that is already a tight face crop (UTKFace's, where MTCNN's box overflows the image)
    is seen whole, as such crops are in training, not in a black frame.
    """
    height, width = (size, size) if isinstance(size, int) else size
    x0, y0, x1, y1 = box
    half_width = max(x1 - x0, (y1 - y0) * width / height) * (0.5 + margin)
    half_height = half_width * height / width
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if inside:
        shrink = min(1.0, image.width / (2 * half_width), image.height / (2 * half_height))
        half_width, half_height = half_width * shrink, half_height * shrink
        cx = min(max(cx, half_width), image.width - half_width)
        cy = min(max(cy, half_height), image.height - half_height)
    region = (round(cx - half_width), round(cy - half_height), round(cx + half_width), round(cy + half_height))
    crop = image.convert("L" if grayscale else "RGB").crop(region).resize((width, height), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(crop))
    return pixels.unsqueeze(0) if grayscale else pixels.permute(2, 0, 1).contiguous()


def _crop_biggest_faces(
    paths: list[Path], names: list[str], size: int, grayscale: bool, device: str
) -> tuple[list[torch.Tensor], list[int]]:
    """The biggest face of each photo, cropped to uint8 [C, size, size], and the positions of the photos they come
    from. Photos that cannot be read or show no face are skipped with a warning naming them (names[i])."""
    crops, kept, unreadable, faceless = [], [], [], []
    for i, (path, name) in enumerate(zip(paths, names)):
        try:
            photo = open_photo(path)
        except UNREADABLE:
            unreadable.append(name)
            continue
        boxes = detect_faces(photo, device)
        if not boxes:
            faceless.append(name)
            continue
        crops.append(crop_face(photo, boxes[0], size, grayscale))
        kept.append(i)
    _warn_skipped(unreadable, "unreadable photos")
    _warn_skipped(faceless, "photos where no face was found")
    return crops, kept


def _crop_face_folders(
    root: Path, size: int, grayscale: bool, classes: tuple[str, ...] | None, device: str
) -> FaceImages:
    folders = [p for p in _entries(root) if p.is_dir() and not p.name.startswith(".")]
    if classes is None:
        classes = tuple(folder.name for folder in folders)
    photos = []
    for folder in folders:
        name = folder.name if folder.name in classes else EMOTION_ALIASES.get(folder.name.lower(), folder.name.lower())
        if name not in classes:
            accepted = classes + tuple(a for a, c in EMOTION_ALIASES.items() if c in classes)
            raise DataError(
                f"unknown class folder '{folder.name}' in {root}: rename it to one of "
                f"{', '.join(accepted)} or remove it"
            )
        photos += [
            (classes.index(name), path)
            for path in _entries(folder)
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
        ]
    if not photos:
        raise DataError(f"no photos (.jpg, .jpeg, .png) in {root}/<class>/: put each class's photos in its own folder")
    names = [path.relative_to(root).as_posix() for _, path in photos]
    crops, kept = _crop_biggest_faces([path for _, path in photos], names, size, grayscale, device)
    if not crops:
        raise DataError(
            f"no face found in any of the {len(photos)} photos in {root}: use photos where a face is clearly visible"
        )
    usage = torch.full((len(crops),), USAGES.index("Training"), dtype=torch.int8)
    return FaceImages(
        torch.stack(crops), torch.tensor([photos[i][0] for i in kept]), usage, [names[i] for i in kept], classes
    )


def face_folders(
    root: str | Path,
    size: int = 48,
    grayscale: bool = True,
    classes: tuple[str, ...] | None = None,
    cache_dir: str | Path | None = None,
    device: str = "cpu",
) -> FaceImages:
    """The biggest face of each photo in root/<class>/*, cropped with MTCNN; cached like load_fer2013.

    classes: the accepted folder names, in label order (EMOTIONS also accepts disgusted, fearful, surprised);
    None takes the folder names, sorted. Photos without a face or that cannot be read are skipped with a warning.
    All images get Usage "Training": split them with a pooled protocol such as utec.
    """
    root = _existing(root, "put the photos in one folder per class, root/<class>/")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: put the photos in one folder per class, root/<class>/")
    classes = None if classes is None else tuple(classes)
    return _cached(
        "faces",
        root,
        (size, grayscale, classes),
        cache_dir,
        lambda: _crop_face_folders(root, size, grayscale, classes, str(device)),
    )


# ---------------------------------------------------------------- labels on photos


def why_unreadable(error: Exception) -> str:
    """What a user should hear about a photo open_photo could not open (one of UNREADABLE, or a missing file)."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError):
        return "a folder, not a photo"
    if isinstance(error, Image.DecompressionBombError):  # Pillow refuses such images: decoding one could fill memory
        return f"over Pillow's limit of {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: shrink it first"
    reason = str(error).strip().splitlines()[0][:80] if str(error).strip() else type(error).__name__
    return f"not a readable image ({reason})"


def draw_labels(photo: Image.Image, boxes, labels: list[str]) -> Image.Image:
    """A copy of photo with each box outlined and its label on a filled strip, readable whatever the photo's size.

    A small photo (a face crop of 80x80, say) is enlarged first, so a label never needs a font too small to read;
    the font grows with the photo; each label sits above its box, or inside it at the top when the box touches the
    photo's top edge, and is shifted left or shrunk to stay inside the picture.
    """
    scale = max(1.0, 480 / min(photo.size))
    out = photo.convert("RGB").resize((round(photo.width * scale), round(photo.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(out)
    red, pad = (220, 40, 40), max(2, min(out.size) // 160)
    for box, label in zip(boxes, labels):
        x0, y0, x1, y1 = (v * scale for v in box)
        draw.rectangle((x0, y0, x1, y1), outline=red, width=max(2, min(out.size) // 200))
        size = max(14, min(out.size) // 28)
        font = ImageFont.load_default(size=size)
        while size > 10 and draw.textlength(label, font=font) + 2 * pad > out.width:
            size -= 1
            font = ImageFont.load_default(size=size)
        text_width, text_height = draw.textlength(label, font=font) + 2 * pad, size + 2 * pad
        left = min(max(0, x0), out.width - text_width)
        top = y0 - text_height if y0 >= text_height else max(0, y0)
        draw.rectangle((left, top, left + text_width, top + text_height), fill=red)
        draw.text((left + pad, top + pad), label, fill="white", font=font)
    return out


def _distinct_names(paths: list[str]) -> list[str]:
    """A name per photo, never the same twice: a/x.jpg and b/x.jpg give a_x and b_x, x.jpg given twice x and x_2."""
    stems = [Path(p).stem for p in paths]
    names = [
        stem if stems.count(stem) == 1 else f"{Path(p).resolve().parent.name}_{stem}" for p, stem in zip(paths, stems)
    ]
    return [
        name if names[:i].count(name) == 0 else f"{name}_{names[:i].count(name) + 1}" for i, name in enumerate(names)
    ]


def predict_photos(
    paths: list[str],
    out_dir: str | Path,
    suffix: str,
    describe: Callable[[torch.Tensor], list],
    size: int | tuple[int, int],
    grayscale: bool,
    margin: float = 0.1,
    device: str = "cpu",
    inside: bool = False,
) -> int:
    """Find every face in each photo (MTCNN), crop it, and let describe(crops) name it; returns the photos read.

    describe takes the uint8 crops [F, C, H, W] of one photo and returns, per face, (line, label): line is printed
    after "<photo> face <i> at (<box>): ", label goes on the annotated copy, out_dir/<photo name>_<suffix>.jpg.
    Photos that cannot be read are skipped with a line saying why; none readable at all is a DataError. inside:
    crop_face's, for models trained on whole face crops.
    """
    read = 0
    for path, name in zip(paths, _distinct_names(paths)):
        try:
            photo = open_photo(path)
        except UNREADABLE as e:
            print(f"{path}: skipped, {why_unreadable(e)}")
            continue
        read += 1
        boxes = detect_faces(photo, device=str(device))
        if not boxes:
            print(f"{path}: no face found")
            continue
        crops = torch.stack([crop_face(photo, box, size, grayscale, margin, inside) for box in boxes])
        described = describe(crops)
        for i, (box, (line, _)) in enumerate(zip(boxes, described)):
            print(f"{path} face {i + 1} at ({box[0]:.0f}, {box[1]:.0f}, {box[2]:.0f}, {box[3]:.0f}): {line}")
        annotated = draw_labels(photo, boxes, [label for _, label in described])
        target = Path(out_dir) / f"{name}_{suffix}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp")
        try:  # a temporary name, then a rename: an earlier copy is never left half-overwritten
            annotated.save(temporary, format="JPEG", quality=92)
            os.replace(temporary, target)
        finally:
            if temporary.exists():
                temporary.unlink()
        print(f"{path}: annotated copy in {target}")
    if not read:
        raise DataError(f"none of the {len(paths)} photos could be read: check the paths")
    return read


# ---------------------------------------------------------------- RGB decoding shared by the attribute readers


def _image_size(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from an int (a square) or a (height, width) pair of positive ints."""
    pair = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise DataError(f"the image size must be a positive int or a (height, width) pair of them, got {size!r}")
    return pair


def _resized_rgb(image: Image.Image, height: int, width: int, square: bool) -> torch.Tensor:
    """image as uint8 [3, height, width]; square first cuts the centre square, so that nothing is stretched."""
    image = _eight_bit(image).convert("RGB")
    if square and image.width != image.height:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _decode_rgb(
    names: list[str], open_image: Callable[[str], Image.Image], height: int, width: int, square: bool
) -> tuple[torch.Tensor, list[int]]:
    """Decode one image at a time into a preallocated uint8 [N, 3, height, width], so that memory never holds
    more than the result. Returns the images and the positions in names that could be read."""
    images = torch.empty(len(names), 3, height, width, dtype=torch.uint8)
    kept, unreadable, oversized = [], [], []
    for i, name in enumerate(names):
        try:
            with open_image(name) as image:
                images[len(kept)] = _resized_rgb(image, height, width, square)
        except UNREADABLE as error:
            (oversized if isinstance(error, ZipMemberTooBig) else unreadable).append(name)
            continue
        kept.append(i)
    _warn_skipped(unreadable, "missing or unreadable images")
    _warn_oversized(oversized)
    # A slice would keep the whole preallocated storage alive, and torch.save would write all of it to the cache.
    return (images if len(kept) == len(names) else images[: len(kept)].clone()), kept


def _available_memory() -> int | None:
    """Bytes of memory a new allocation can take (Linux: MemAvailable in /proc/meminfo); None where unknown."""
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _bytes_text(count: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def _decoded_bytes(what: str, count: int, height: int, width: int, fix: str) -> int:
    """Bytes of count RGB images decoded at height x width; DataError saying `fix` when memory cannot hold them."""
    need, available = count * 3 * height * width, _available_memory()
    if available is not None and need > available:
        raise DataError(
            f"{what}: {count:,} images at {height}x{width} need {_bytes_text(need)} but only "
            f"{_bytes_text(available)} of memory is available: {fix}"
        )
    return need


# ---------------------------------------------------------------- CelebA attributes

CELEBA_PARTS = ("train", "val", "test")  # list_eval_partition's 0, 1, 2
CELEBA_CROPS = ("none", "square")
GET_CELEBA = (
    "download CelebA's list_attr_celeba.txt, list_eval_partition.txt and img_align_celeba.zip (or "
    "Kaggle's CelebA csv files and zip) into one folder"
)


def _celeba_list(root: Path, stem: str) -> Path | None:
    """root/stem.txt (the official file), else root/stem.csv (Kaggle's); None when neither is there."""
    for suffix in (".txt", ".csv"):
        if (root / (stem + suffix)).is_file():
            return root / (stem + suffix)
    return None


def _table_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line: split at commas in a .csv, at runs of spaces in a .txt."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet may have added a BOM
            if path.suffix == ".csv":
                rows = csv.reader(file)
                for row in rows:
                    if row:
                        yield rows.line_num, row
            else:
                for number, line in enumerate(file, 1):
                    fields = line.split()
                    if fields:
                        yield number, fields
    except (UnicodeDecodeError, csv.Error) as e:  # e.g. a binary file under the list's name
        raise DataError(
            f"{path.name} is not a readable text file ({textwrap.shorten(str(e), 60)}): {GET_CELEBA}"
        ) from None
    except OSError as error:  # no read permission, a disk error
        raise _cannot_read(path, error) from None


def _celeba_rows(
    path: Path, lines: Iterator[tuple[int, list[str]]], width: int, codes: dict[str, str], meaning: str, allowed: str
) -> tuple[list[str], str]:
    """Check the rows of a CelebA list (width fields: a file name, then values that are keys of codes; no file
    twice). Returns the file names and every value's code, one character each, in one string: a string holds
    list_attr_celeba's 8 million values in 8 MB, where a list of them would take hundreds."""
    files, values, seen = [], [], set()
    for number, fields in lines:
        if len(fields) != width:
            raise DataError(
                f"{path.name} line {number} has {len(fields)} fields, expected {width} ({meaning}): fix or delete it"
            )
        try:
            values.append("".join(map(codes.__getitem__, fields[1:])))
        except KeyError as bad:
            raise DataError(f"{path.name} line {number}: {bad.args[0]!r} is not {allowed}: fix or delete it") from None
        if fields[0] in seen:
            raise DataError(f"{path.name} line {number} lists {fields[0]} a second time: delete one of the two lines")
        seen.add(fields[0])
        files.append(fields[0])
    return files, "".join(values)


def _digits(codes: str) -> np.ndarray:
    return np.frombuffer(codes.encode("ascii"), np.uint8) - ord("0")


def _read_celeba_attributes(path: Path) -> tuple[list[str], torch.Tensor, tuple[str, ...]]:
    """list_attr_celeba.txt (line 1: the count, line 2: the names) or .csv (header image_id,<names>)."""
    lines = _table_lines(path)
    first = next(lines, None)
    if first is None:
        raise DataError(f"{path.name} is empty: {GET_CELEBA}")
    number, fields = first
    if path.suffix == ".csv":
        if fields[0] != "image_id" or len(fields) < 2:
            raise DataError(
                f"{path.name} has the header {_shown(fields)}, expected image_id and the attribute "
                f"names: pass Kaggle's list_attr_celeba.csv"
            )
        count, names = None, tuple(fields[1:])
    else:
        if len(fields) != 1 or not fields[0].isdigit():
            raise DataError(
                f"{path.name} line {number} is {_shown(fields, ' ', 40)}, expected the "
                f"image count: pass CelebA's list_attr_celeba.txt (line 1 the count, line 2 the names)"
            )
        second = next(lines, None)
        if second is None:
            raise DataError(f"{path.name} has no attribute names after line {number}: {GET_CELEBA}")
        count, names = int(fields[0]), tuple(second[1])
    files, codes = _celeba_rows(
        path, lines, len(names) + 1, {"-1": "0", "1": "1"}, f"a file name and {len(names)} attribute values", "-1 or 1"
    )
    if count is not None and count != len(files):
        raise DataError(
            f"{path.name} line {number} says {count:,} images but {len(files):,} are listed: the file "
            f"is cut off or edited, download it again"
        )
    if not files:
        raise DataError(f"{path.name} lists no images: {GET_CELEBA}")
    attributes = torch.from_numpy(_digits(codes).astype(np.int64).reshape(len(files), len(names)))
    return files, attributes, names


def _read_celeba_partition(path: Path) -> dict[str, str]:
    """list_eval_partition.txt (no header) or .csv (header image_id,partition): file name -> "0", "1" or "2"."""
    lines = _table_lines(path)
    if path.suffix == ".csv":
        header = next(lines, (1, []))[1]
        if header != ["image_id", "partition"]:
            raise DataError(
                f"{path.name} has the header {_shown(header)}, expected image_id,partition: pass "
                f"Kaggle's list_eval_partition.csv"
            )
    files, codes = _celeba_rows(
        path,
        lines,
        2,
        {"0": "0", "1": "1", "2": "2"},
        "a file name and its partition",
        "0 (train), 1 (val) or 2 (test)",
    )
    return dict(zip(files, codes))


def read_celeba_labels(
    root: str | Path, need_partition: bool = False
) -> tuple[list[str], torch.Tensor, tuple[str, ...], torch.Tensor]:
    """CelebA's labels without decoding any image: (file names, int64 [N, 40] attributes 0/1, attribute names,
    int8 [N] official partition 0 train, 1 val, 2 test), in list_attr_celeba's order.

    A sample is drawn from these first (concepcion_sample), so that load_celeba decodes only what it needs.
    Without list_eval_partition the partition is -1 everywhere, with a warning; with need_partition (the official
    split or a sample drawn from it) that is a DataError.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(
            f"{root.absolute()} does not exist, so CelebA's lists (list_attr_celeba.txt, "
            f"list_eval_partition.txt) were not found: {GET_CELEBA}, and pass that folder"
        )
    attributes_path = _celeba_list(root, "list_attr_celeba")
    if attributes_path is None:
        raise DataError(
            f"CelebA's lists were not found (no list_attr_celeba.txt or list_attr_celeba.csv in "
            f"{root.absolute()}): {GET_CELEBA}"
        )
    partition_path = _celeba_list(root, "list_eval_partition")
    if partition_path is None and need_partition:
        raise DataError(
            f"no list_eval_partition.txt or list_eval_partition.csv in {root.absolute()}: CelebA's "
            f"official train/val/test partition comes from it; {GET_CELEBA}"
        )
    files, attributes, names = _read_celeba_attributes(attributes_path)
    if partition_path is None:
        warnings.warn(
            f"no list_eval_partition.txt or list_eval_partition.csv in {root}: every image gets the "
            f"partition -1 (none), so the official train/val/test split cannot be used"
        )
        return files, attributes, names, torch.full((len(files),), -1, dtype=torch.int8)
    partition = _read_celeba_partition(partition_path)
    unpartitioned = next((name for name in files if name not in partition), None)
    if unpartitioned is not None:
        raise DataError(
            f"{unpartitioned} is in {attributes_path.name} but not in {partition_path.name}: use the "
            f"two lists of one CelebA download"
        )
    if len(partition) != len(files):  # every listed file is in partition, so partition has more
        listed = set(files)
        extra = next(name for name in partition if name not in listed)
        raise DataError(
            f"{extra} is in {partition_path.name} but not in {attributes_path.name}: use the two lists "
            f"of one CelebA download"
        )
    codes = "".join(partition[name] for name in files)
    return files, attributes, names, torch.from_numpy(_digits(codes).astype(np.int8))


def select_attributes(names_available: Sequence[str], wanted: Sequence[str]) -> list[int]:
    """Positions in names_available of the wanted names (case-sensitive, as CelebA spells them: Male, Eyeglasses,
    Smiling), in the order wanted, each once; ["all"] means every attribute."""
    names_available = list(names_available)
    if list(wanted) == ["all"]:
        return list(range(len(names_available)))
    if not wanted:
        raise DataError(f"no attribute chosen: name one or more of {', '.join(names_available)}, or all")
    by_lower_case = {name.lower(): name for name in names_available}
    for name in wanted:
        if name not in names_available:
            # Compared in lower case, so that "smiling" suggests Smiling.
            close = [by_lower_case[match] for match in difflib.get_close_matches(name.lower(), list(by_lower_case))]
            hint = (
                f"did you mean {' or '.join(close)}? (names are case-sensitive)"
                if close
                else f"choose from {', '.join(names_available)}, or all"
            )
            raise DataError(f"unknown attribute {name!r}: {hint}")
    return [names_available.index(name) for name in dict.fromkeys(wanted)]


def concepcion_sample(
    attributes: torch.Tensor,
    partition: torch.Tensor,
    column: int,
    sizes: tuple[int, int, int] = (10_000, 2_000, 1_000),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The Concepción report's balanced sample for one attribute: "train", "val" and "test" indices.

    Part i is a seeded draw of sizes[i] images from the official partition i (0 train, 1 val, 2 test), exactly
    half with the attribute (attributes[:, column] == 1) and half without (an odd size gives the extra one to
    "without"), so that accuracy is not inflated by the attribute's frequency. Each part is sorted.
    """
    if len(sizes) != 3 or not all(isinstance(size, int) and size >= 0 for size in sizes):
        raise ValueError(f"sizes must be three ints >= 0 (train, val, test), got {sizes!r}")
    generator = torch.Generator().manual_seed(seed)
    having = attributes[:, column].cpu() == 1
    partition = partition.cpu()
    sample = {}
    for part, (name, size) in enumerate(zip(CELEBA_PARTS, sizes)):
        inside = partition == part
        pools = [(inside & having).nonzero().flatten(), (inside & ~having).nonzero().flatten()]
        wanted = [size // 2, size - size // 2]
        if len(pools[0]) < wanted[0] or len(pools[1]) < wanted[1]:
            if not (partition >= 0).any():
                raise DataError(
                    "the data has no official partition (list_eval_partition.txt is missing): put it "
                    "next to list_attr_celeba.txt"
                )
            raise DataError(
                f"the official {name} partition has {len(pools[0]):,} images with attribute column "
                f"{column} and {len(pools[1]):,} without, too few for a balanced {size:,} ({wanted[0]:,} "
                f"with, {wanted[1]:,} without): make the sample sizes smaller"
            )
        drawn = [pool[torch.randperm(len(pool), generator=generator)[:count]] for pool, count in zip(pools, wanted)]
        sample[name] = torch.cat(drawn).sort().values
    return sample


def _celeba_images_and_decode(
    root: Path, names: list[str], height: int, width: int, square: bool
) -> tuple[torch.Tensor, list[int]]:
    """_decode_rgb of the CelebA images names, from root/img_align_celeba/ or else root/img_align_celeba.zip."""
    folder = root / "img_align_celeba"
    if (folder / "img_align_celeba").is_dir():  # Kaggle's zip, extracted, nests the folder one level deeper
        folder = folder / "img_align_celeba"
    if folder.is_dir():
        return _decode_rgb(names, lambda name: Image.open(folder / name), height, width, square)
    path = root / "img_align_celeba.zip"
    if not path.is_file():
        raise DataError(f"no img_align_celeba/ folder or img_align_celeba.zip in {root}: {GET_CELEBA}")
    with _open_zip(path, f"extract it into {folder}") as archive:
        # The official zip holds img_align_celeba/<name>; Kaggle's nests that folder once more.
        folders = ("img_align_celeba", "img_align_celeba/img_align_celeba")
        members = {
            PurePosixPath(member).name: member
            for member in archive.namelist()
            if PurePosixPath(member).parent.as_posix() in folders
        }
        if not members:
            raise DataError(f"{path} holds no img_align_celeba/*.jpg: download it again")

        def open_member(name: str) -> Image.Image:
            if name not in members:
                raise FileNotFoundError(name)
            return _zip_image(archive, members[name])

        return _decode_rgb(names, open_member, height, width, square)


def _decode_celeba(root: Path, index: torch.Tensor, height: int, width: int, crop: str) -> AttributeFaces:
    files, attributes, names, partition = read_celeba_labels(root)
    if len(index) and not (0 <= int(index.min()) and int(index.max()) < len(files)):
        raise DataError(
            f"the sample holds positions up to {int(index.max()):,} but {root} lists {len(files):,} "
            f"images: draw the sample from read_celeba_labels of this folder"
        )
    chosen = [files[i] for i in index.tolist()]
    images, kept = _celeba_images_and_decode(root, chosen, height, width, crop == "square")
    if chosen and not kept:
        raise DataError(
            f"none of the {len(chosen):,} sampled images in {root} could be read: download img_align_celeba.zip again"
        )
    kept_index = index[kept]
    return AttributeFaces(images, attributes[kept_index], names, partition[kept_index], [chosen[i] for i in kept])


def load_celeba(
    root: str | Path,
    index: torch.Tensor | Sequence[int],
    size: int | tuple[int, int] = (218, 178),
    crop: str = "none",
    cache_dir: str | Path | None = None,
) -> AttributeFaces:
    """The CelebA images at index (positions in read_celeba_labels' order, kept in that order) as uint8
    [len(index), 3, height, width], with all 40 attributes and the partition; cached like load_fer2013.

    Only these images are decoded, one at a time, so that a 13,000-image sample of the 202,599 never needs the
    whole set in memory. size is (height, width) or an int for a square. crop "none" resizes the whole
    178x218 image (as the Concepción report did, at 218x178); "square" takes its centre 178x178 square first,
    the usual face crop for 64-128 px models. Unreadable images are skipped with a warning.
    """
    root = _existing(root, GET_CELEBA)
    height, width = _image_size(size)
    if crop not in CELEBA_CROPS:
        raise DataError(f"unknown CelebA crop {crop!r}: choose one of {', '.join(CELEBA_CROPS)}")
    index = torch.as_tensor(index, dtype=torch.int64).flatten().cpu()
    need = _decoded_bytes("celeba", len(index), height, width, "lower the sample sizes or the image size")
    # A list edited in place leaves the folder's fingerprint unchanged: the files' own sizes and times join the key.
    sources = [
        root / name
        for name in (
            "list_attr_celeba.txt",
            "list_attr_celeba.csv",
            "list_eval_partition.txt",
            "list_eval_partition.csv",
            "img_align_celeba.zip",
        )
    ]
    settings = (
        hashlib.sha256(index.numpy().tobytes()).hexdigest(),
        (height, width),
        crop,
        [(path.name, *_fingerprint(path)) for path in sources if path.is_file()],
    )

    def decode() -> AttributeFaces:
        print(f"celeba: decoding {len(index):,} images at {height}x{width} into {_bytes_text(need)}", flush=True)
        return _decode_celeba(root, index, height, width, crop)

    return _cached("celeba", root, settings, cache_dir, decode, AttributeFaces)


# ---------------------------------------------------------------- UTKFace

UTKFACE_COLUMNS = ("gender", "age", "race")
UTKFACE_GENDERS = ("male", "female")  # the gender ids 0, 1 in the file names
UTKFACE_RACES = ("White", "Black", "Asian", "Indian", "Others")  # the race ids 0..4 in the file names
UTKFACE_SPLITS = ("stratified", "utec")
AGE_GROUPS = (12, 19, 39, 59)  # upper bounds: 0-12, 13-19, 20-39, 40-59, 60+
# The fewest images each part of a UTKFace split may hold: on fewer, training learns next to nothing and a test
# part measures accuracy in steps of over 10 points (a 3-image set gave 2 train and 1 test image, unsaid).
UTKFACE_MIN_PART = 10
GET_UTKFACE = (
    "download UTKFace and pass the folder of its <age>_<gender>_<race>_<datetime>.jpg images "
    "(UTKFace/, crop_part1/) or the folder above it"
)


def _utkface_targets(file_name: str) -> tuple[int, int, int] | None:
    """(gender, age, race) from <age>_<gender>_<race>_<datetime>.jpg[.chip.jpg]; None when the name is not that."""
    stem = file_name[: -len(".chip.jpg")] if file_name.lower().endswith(".chip.jpg") else file_name
    fields = PurePosixPath(stem).stem.split("_")
    if len(fields) != 4 or not all(field.isascii() and field.isdigit() for field in fields):
        return None
    age, gender, race = (int(field) for field in fields[:3])
    if not (0 <= age <= 120 and gender in (0, 1) and 0 <= race < len(UTKFACE_RACES)):
        return None
    return gender, age, race


def _image_files(folder: Path) -> list[Path]:
    """The images in folder, sorted; hidden files (macOS's ._<name> copies) and other files left out."""
    return [
        path
        for path in _entries(folder)
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    ]


def _utkface_folder(root: Path) -> tuple[Path, list[Path]]:
    """root and its images, or root's one subfolder of images (the folder above crop_part1/) and its images.
    Subfolders that cannot be read are passed over with one warning naming them."""
    photos = _image_files(root)
    if photos:
        return root, photos
    holding, unreadable = [], []
    for folder in _entries(root):
        if folder.is_dir() and not folder.name.startswith("."):
            try:
                holding.append((folder, _image_files(folder)))
            except DataError:
                unreadable.append(folder.name + "/")
    _warn_skipped(unreadable, "folders that cannot be read (check their permissions)")
    holding = [(folder, photos) for folder, photos in holding if photos]
    if len(holding) > 1:
        raise DataError(
            f"{root} holds several folders of images ({_first_few([f.name for f, _ in holding])}): pass the one to read"
        )
    if not holding:
        raise DataError(f"no images (.jpg, .jpeg, .png) in {root} or in a folder inside it: {GET_UTKFACE}")
    return holding[0]


def holds_utkface_images(root: str | Path) -> bool:
    """Whether root, or a folder inside it, holds an image named as UTKFace's: <age>_<gender>_<race>_<datetime>.jpg.
    Folders inside root that cannot be read are passed over; root itself is a DataError."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return False
    entries = _entries(root)
    for folder in [root, *(entry for entry in entries if entry.is_dir())]:
        try:
            names = [entry.name for entry in (entries if folder == root else folder.iterdir())]
        except OSError:
            continue
        if any(name.lower().endswith(IMAGE_SUFFIXES) and _utkface_targets(name) for name in names):
            return True
    return False


def _read_utkface(
    folder: Path, photos: list[Path], targets: list[tuple[int, int, int]], size: int, crop_faces: bool, device: str
) -> AttributeFaces:
    names = [path.name for path in photos]
    if crop_faces:
        crops, kept = _crop_biggest_faces(photos, names, size, False, device)
        if not crops:
            raise DataError(
                f"no face found in any of the {len(photos):,} photos in {folder}: pass photos where a "
                f"face is clearly visible, or the aligned crops without crop_faces"
            )
        images = torch.stack(crops)
    else:
        images, kept = _decode_rgb(names, lambda name: Image.open(folder / name), size, size, square=True)
        if not kept:
            raise DataError(f"none of the {len(photos):,} images in {folder} could be read: {GET_UTKFACE}")
    partition = torch.full((len(kept),), -1, dtype=torch.int8)
    return AttributeFaces(
        images,
        torch.tensor([targets[i] for i in kept], dtype=torch.int64),
        UTKFACE_COLUMNS,
        partition,
        [names[i] for i in kept],
    )


def load_utkface(
    root: str | Path, size: int = 64, cache_dir: str | Path | None = None, crop_faces: bool = False, device: str = "cpu"
) -> AttributeFaces:
    """UTKFace as RGB size x size images with the columns gender (0 male, 1 female), age and race (0-4), partition
    -1; cached like load_fer2013.

    root is a folder of <age>_<gender>_<race>_<datetime>.jpg[.chip.jpg] images, or the folder above exactly one
    such folder. Images that are not square lose their edges rather than being stretched. crop_faces: the
    images are in-the-wild photos; the biggest face of each is cropped with MTCNN first and photos without one
    are skipped with a warning. Names that do not parse (a field missing, an age over 120) are skipped with one
    warning, on every load.
    """
    root = _existing(root, GET_UTKFACE)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: {GET_UTKFACE}")
    if not isinstance(size, int) or size <= 0:
        raise DataError(f"the UTKFace image size must be a positive int (the side of a square), got {size!r}")
    folder, photos = _utkface_folder(root)
    parsed = [(path, _utkface_targets(path.name)) for path in photos]
    named = [(path, targets) for path, targets in parsed if targets is not None]
    if not named:
        raise DataError(
            f"none of the {len(photos):,} images in {folder} is named <age>_<gender>_<race>_<datetime>"
            f".jpg: {GET_UTKFACE}"
        )
    _warn_skipped(
        [path.name for path, targets in parsed if targets is None],
        "UTKFace files whose names are not <age>_<gender>_<race>_<date>",
    )
    photos, targets = [path for path, _ in named], [targets for _, targets in named]
    # Before the cache too: a cached set at this size is as big, and an impossible size must not start decoding
    _decoded_bytes("utkface", len(photos), size, size, "lower --image-size or pass fewer images")
    return _cached(
        "utkface",
        folder,
        (size, crop_faces),
        cache_dir,
        lambda: _read_utkface(folder, photos, targets, size, crop_faces, str(device)),
        AttributeFaces,
    )


def _check_age_bounds(bounds: Sequence[int]) -> None:
    if not (
        len(bounds) > 0
        and all(isinstance(b, int) and b > 0 for b in bounds)
        and all(a < b for a, b in zip(bounds, bounds[1:]))
    ):
        raise ValueError(f"age group bounds must be increasing positive ints, got {tuple(bounds)!r}")


def age_group(ages: torch.Tensor, bounds: Sequence[int] = AGE_GROUPS) -> torch.Tensor:
    """The age group of each age: 0 up to bounds[0] (inclusive), 1 up to bounds[1], ..., len(bounds) above."""
    _check_age_bounds(bounds)
    ages = torch.as_tensor(ages).contiguous()
    return torch.bucketize(ages, torch.tensor(bounds, dtype=ages.dtype, device=ages.device))


def age_group_names(bounds: Sequence[int] = AGE_GROUPS) -> tuple[str, ...]:
    """("0-12", "13-19", "20-39", "40-59", "60+") for AGE_GROUPS."""
    _check_age_bounds(bounds)
    lows = [0] + [bound + 1 for bound in bounds]
    return tuple(f"{low}-{high}" for low, high in zip(lows, bounds)) + (f"{lows[-1]}+",)


def utkface_split(
    targets: torch.Tensor,
    protocol: str = "stratified",
    seed: int = 0,
    bounds: Sequence[int] = AGE_GROUPS,
    val_fraction: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Indices "train", "val" and "test" of UTKFace targets (columns gender, age, race).

    stratified  seeded 80% train, 20% test, each gender x age group in proportion
    utec        the UTEC report's 70% train, 30% test, with at least min(50, n // 2) of each gender x age group
                of n images in train
    val_fraction of the train part (stratified the same way) becomes "val"; the test part is the same whatever it is,
    so runs with and without validation are tested on the same faces. A part (val only when asked for) of fewer
    than UTKFACE_MIN_PART images is a DataError.
    """
    if protocol not in UTKFACE_SPLITS:
        raise DataError(f"unknown UTKFace split protocol {protocol!r}: choose one of {', '.join(UTKFACE_SPLITS)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation share of the UTKFace training part must be in [0, 1), got {val_fraction}")
    groups = age_group(targets[:, UTKFACE_COLUMNS.index("age")].cpu(), bounds)
    strata = targets[:, UTKFACE_COLUMNS.index("gender")].cpu() * (len(bounds) + 1) + groups
    if protocol == "stratified":
        train, test = stratified_split(strata, [0.8, 0.2], seed)
    else:
        train, test = stratified_split(strata, [0.7, 0.3], seed, min_per_class=50)
    val = torch.zeros(0, dtype=torch.int64)
    if val_fraction:
        val, kept = stratified_split(strata[train], [val_fraction, 1 - val_fraction], seed)
        val, train = train[val], train[kept]
    split = {"train": train, "val": val, "test": test}
    used = {part: len(index) for part, index in split.items() if part != "val" or val_fraction}
    if min(used.values()) < UTKFACE_MIN_PART:
        raise DataError(
            f"the {protocol} split of {len(targets)} UTKFace images leaves "
            + ", ".join(f"{count} for {part}" for part, count in used.items())
            + f": each part needs at least {UTKFACE_MIN_PART} images (on fewer, training learns next to "
            f"nothing and a test measures accuracy in steps of over 10 points): use more images"
        )
    return split


# ---------------------------------------------------------------- synthetic attribute faces

SYNTHETIC_TASKS = ("celeba", "utkface")
# Skin colours (RGB) for the race ids 0..4 of UTKFace (White, Black, Asian, Indian, Others): a cue to learn.
_SKIN_TONES = torch.tensor(
    [[0.93, 0.80, 0.70], [0.40, 0.27, 0.19], [0.91, 0.76, 0.56], [0.66, 0.48, 0.36], [0.80, 0.62, 0.50]]
)


def _draw_attribute_faces(
    male: torch.Tensor,
    glasses: torch.Tensor,
    smiling: torch.Tensor,
    age: torch.Tensor,
    race: torch.Tensor,
    size: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Colour cartoon faces as floats in [0, 1] of shape [n, 3, size, size], one per row of the labels.

    male: short hair, a wider jaw and a beard shade (women: long hair down the sides); glasses: two rings and a bridge;
    smiling: mouth corners up (else flat); age: grey hair from 25 to 75, a forehead line at 35, 50 and 65,
    big eyes and a small head below 18; race: the skin colour. Position, scale, hair and background colours,
    brightness, contrast and noise vary per face, so a classifier must learn the cues.
    """
    n = len(male)

    def uniform(low: float, high: float, channels: int = 1) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, channels, 1, 1, generator=generator)

    def per_face(values: torch.Tensor) -> torch.Tensor:
        return values.float().view(n, 1, 1)

    male, glasses, smiling, age = (per_face(v) for v in (male, glasses, smiling, age))
    young = ((18 - age) / 18).clamp(0, 1)  # 1 for a newborn, 0 from 18 on
    # Face coordinates as in _draw_faces: the face is an oval about 1.25 wide and 1.6 tall around (0, 0.05).
    axis = torch.linspace(-1, 1, size)
    scale = uniform(0.72, 0.86).view(n, 1, 1) * (1 - 0.15 * young)
    x = (axis.view(1, 1, size) - uniform(-0.06, 0.06).view(n, 1, 1)) / scale
    y = (axis.view(1, size, 1) - uniform(-0.06, 0.06).view(n, 1, 1)) / scale - 0.05
    pixel = 2 / size / scale
    side = x.abs()  # both eyes and both glasses' rings at once: mirror the left half onto the right
    # A man's jaw is wider: his face widens below the eyes, towards the chin.
    jaw = 1 + 0.22 * male * (y / 0.8).clamp(0, 1)
    face = _inside((torch.sqrt((side / (0.62 * jaw)) ** 2 + (y / 0.8) ** 2) - 1) * 0.62, pixel)
    head = _inside((torch.sqrt((x / 0.72) ** 2 + ((y + 0.12) / 0.92) ** 2) - 1) * 0.72, pixel)
    # Boxes are products of a row mask [n, size, 1] and a column mask [n, 1, size]: one full-size operation each.
    cap = head * _inside(y + 0.42, pixel)  # everyone's hair above the forehead
    long = _inside(side - 0.86, pixel) * _inside((y - 0.35).abs() - 0.45, pixel)  # down the sides to the shoulders
    hair = torch.maximum(cap, torch.maximum(head, long) * (1 - male))
    beard = male * face * _inside(0.12 - y, pixel)  # a stubble shade that stays visible when the hair turns grey
    eye_height = 0.07 * (1 + 0.6 * young)
    eye = _inside((torch.sqrt(((side - 0.26) / 0.1) ** 2 + ((y + 0.12) / eye_height) ** 2) - 1) * 0.07, pixel)
    ring = _inside((torch.sqrt((side - 0.26) ** 2 + (y + 0.12) ** 2) - 0.17).abs() - 0.03, pixel)
    bridge = _inside((y + 0.12).abs() - 0.025, pixel) * _inside(side - 0.1, pixel)
    frame = torch.maximum(ring, bridge) * glasses
    curve = smiling * uniform(0.09, 0.15).view(n, 1, 1) + uniform(-0.015, 0.015).view(n, 1, 1)
    along = (x / 0.24).clamp(-1, 1)  # -1..1 from one mouth corner to the other
    mouth = _inside((y - 0.4 - curve * (1 - 2 * along**2)).abs() - 0.04, pixel) * _inside(side - 0.24, pixel)
    lines = sum(
        ((age - start) / 10).clamp(0, 1) * _inside((y - at).abs() - 0.018, pixel)
        for start, at in ((35, -0.36), (50, -0.28), (65, -0.2))
    ) * _inside(side - 0.28, pixel)
    grey = ((age - 25) / 50).clamp(0, 1).unsqueeze(1)
    hair_colour = uniform(0.05, 0.45) * torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1) * (1 - grey) + 0.75 * grey
    skin = _SKIN_TONES[race].view(n, 3, 1, 1) * uniform(0.9, 1.1)
    image = uniform(0.3, 1.0, 3)  # background
    # Eyes, mouth, forehead lines and glasses lie inside the face: painted over it, they need no face mask.
    for mask, colour in (
        (hair, hair_colour),
        (face, skin),
        (0.5 * beard, 0.6 * skin),
        (eye, 0.1),
        (mouth, 0.25),
        (0.4 * lines, 0.2),
        (frame, 0.05),
    ):
        image = torch.lerp(image, torch.as_tensor(colour), mask.unsqueeze(1))
    contrast = uniform(0.8, 1.2)
    image = image * contrast + (0.5 - 0.5 * contrast + uniform(-0.08, 0.08))  # contrast, brightness
    image = image + 0.04 * torch.randn(image.shape, generator=generator)
    return image.clamp(0, 1)


def synthetic_attribute_faces(n: int = 2000, task: str = "celeba", size: int = 64, seed: int = 0) -> AttributeFaces:
    """Deterministic colour cartoon faces with learnable attributes, for demos and tests (no download).

    task "celeba": columns ("Male", "Eyeglasses", "Smiling"), each exactly half 1, drawn independently; partition
    0 (train) for the first 80%, 1 (val) for the next 10%, 2 (test) for the last 10%.
    task "utkface": columns ("gender", "age", "race"): gender exactly half 1 (female), age uniform 1-90, race
    uniform 0-4; partition -1. See _draw_attribute_faces for how each label shows.
    """
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}: choose one of {', '.join(SYNTHETIC_TASKS)}")
    generator = torch.Generator().manual_seed(seed)

    def half_ones() -> torch.Tensor:
        return (torch.randperm(n, generator=generator) < n // 2).long()

    if task == "celeba":
        columns = ("Male", "Eyeglasses", "Smiling")
        targets = torch.stack([half_ones() for _ in columns], 1)
        male, glasses, smiling = targets.T
        age = torch.randint(20, 46, (n,), generator=generator)  # not a label here: adults, some grey hair
        race = torch.randint(0, len(_SKIN_TONES), (n,), generator=generator)
        partition = torch.full((n,), 2, dtype=torch.int8)
        partition[: round(0.9 * n)] = 1
        partition[: round(0.8 * n)] = 0
    else:
        columns = UTKFACE_COLUMNS
        female = half_ones()
        age = torch.randint(1, 91, (n,), generator=generator)
        race = torch.randint(0, len(_SKIN_TONES), (n,), generator=generator)
        targets = torch.stack([female, age, race], 1)
        male, glasses = 1 - female, torch.zeros(n, dtype=torch.int64)
        smiling = torch.randint(0, 2, (n,), generator=generator)  # not a label here: a nuisance to ignore
        partition = torch.full((n,), -1, dtype=torch.int8)
    # A few hundred faces at a time: the tensors then stay in the CPU cache, which is several times faster.
    image = torch.cat(
        [
            _draw_attribute_faces(*labels, size, generator)
            for labels in zip(*(v.split(256) for v in (male, glasses, smiling, age, race)))
        ]
    )
    images = (image * 255).round().to(torch.uint8)
    return AttributeFaces(images, targets, columns, partition, [f"synthetic {i}" for i in range(n)])


# ---------------------------------------------------------------- face images without labels (GANs)

GET_FACES = (
    "pass a folder of face images (.jpg, .jpeg, .png; its subfolders are read too), such as CelebA's "
    "img_align_celeba/, or a .zip of them"
)


@dataclass
class UnlabelledFaces:
    """Decoded RGB face images and the name of each (its path inside the folder or zip), for messages."""

    images: torch.Tensor  # uint8 [N, 3, H, W]
    files: list[str]

    def __post_init__(self):
        if len(self.images) != len(self.files):  # a damaged cache as well as a reader bug
            raise ValueError(
                f"UnlabelledFaces fields differ in length: {len(self.images)} images, {len(self.files)} files"
            )

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: torch.Tensor) -> UnlabelledFaces:
        """The images at index (an int64 index tensor), in that order."""
        return UnlabelledFaces(self.images[index], [self.files[i] for i in index.tolist()])


def _is_image_name(name: str) -> bool:
    """An image by its ending, outside hidden files and folders (macOS's ._<name> copies, __MACOSX/ in zips)."""
    parts = PurePosixPath(name).parts
    return (
        bool(parts)
        and PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith((".", "__MACOSX")) for part in parts)
    )


def _files_below(root: Path) -> list[str]:
    """Every file in root and its subfolders (links to folders not followed), as posix paths inside root. A
    subfolder that cannot be read is skipped with one warning naming it; root itself is a DataError."""
    names, unreadable, folders = [], [], [root]
    while folders:
        folder = folders.pop()
        try:
            entries = list(folder.iterdir())
        except OSError as error:
            if folder == root:
                raise _cannot_read(root, error) from None
            unreadable.append(folder.relative_to(root).as_posix() + "/")
            continue
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                folders.append(entry)
            elif entry.is_file():
                names.append(entry.relative_to(root).as_posix())
    _warn_skipped(sorted(unreadable), "folders that cannot be read (check their permissions)")
    return names


def _face_image_names(path: Path) -> list[str]:
    """The images of a folder (with its subfolders) or of a zip, as sorted posix paths inside it."""
    if path.is_dir():
        names = _files_below(path)
    elif path.suffix.lower() == ".zip":
        with _open_zip(path, "unzip it and pass the folder") as archive:
            names = [member.filename for member in archive.infolist() if not member.is_dir()]
    else:
        raise DataError(f"{path} is neither a folder nor a .zip: {GET_FACES}")
    names = sorted(name for name in names if _is_image_name(name))
    if not names:
        raise DataError(
            f"no images (.jpg, .jpeg, .png) in {path}{' or its subfolders' if path.is_dir() else ''}: {GET_FACES}"
        )
    return names


def _read_face_images(path: Path, names: list[str], size: int) -> UnlabelledFaces:
    need = _decoded_bytes("faces", len(names), size, size, "lower --image-size or pass fewer images")
    print(f"faces: decoding {len(names):,} images from {path} at {size}x{size} into {_bytes_text(need)}", flush=True)
    if path.is_dir():
        images, kept = _decode_rgb(names, lambda name: Image.open(path / name), size, size, square=True)
    else:
        with _open_zip(path, "unzip it and pass the folder") as archive:
            images, kept = _decode_rgb(names, lambda name: _zip_image(archive, name), size, size, square=True)
    if not kept:
        raise DataError(
            f"none of the {len(names):,} images in {path} could be read (damaged, or not images): {GET_FACES}"
        )
    return UnlabelledFaces(images, [names[i] for i in kept])


def load_face_images(path: str | Path, size: int = 64, cache_dir: str | Path | None = None) -> UnlabelledFaces:
    """Every image in a folder (subfolders included) or a .zip, as RGB size x size uint8 [N, 3, size, size] with
    its name; decoded once, then loaded from cache_dir like load_fer2013.

    Images that are not square are cut to their centre square first (CelebA's 178x218 img_align_celeba: its
    centre 178x178, the crop of pytorch/examples' DCGAN), then resized (bilinear, antialiased). Files are taken by
    their ending (.jpg, .jpeg, .png) in sorted order; hidden files and folders are left out. Unreadable images
    are skipped with a warning naming them; a path that is missing, empty of images, not a folder or zip, or a
    damaged zip is a DataError.
    """
    path = _existing(path, GET_FACES)
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise DataError(f"the image size must be a positive int (the side of a square), got {size!r}")
    names = _face_image_names(path)
    # The folder's fingerprint sees two levels down; the names themselves join the key for deeper trees.
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()
    return _cached(
        "faces", path, (size, digest), cache_dir, lambda: _read_face_images(path, names, size), UnlabelledFaces
    )


def holdout_split(count: int, holdout: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held_out): int64 positions in range(count), a seeded random `holdout` of them and the rest, each
    sorted; disjoint and together all of range(count). The same count, holdout and seed give the same split."""
    if not 0 < holdout < count:
        raise ValueError(f"a held-out part of {holdout} images needs between 1 and {count - 1} of {count}")
    chosen = torch.zeros(count, dtype=torch.bool)
    chosen[torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:holdout]] = True
    return (~chosen).nonzero().flatten(), chosen.nonzero().flatten()
