"""Face image data: readers, splits, a decode cache, synthetic faces and MTCNN face crops.

Formats read:
  * FER-2013 as the Kaggle image folders: root/train/<class>/Training_<id>.jpg, root/test/<class>/PublicTest_<id>.jpg
  * the same folders straight from the Kaggle download .zip, without extracting it
  * the original fer2013.csv (emotion,pixels,Usage) and icml_face_data.csv (emotion, Usage, pixels)
  * any folder of photos root/<class>/*, cropped to the biggest face with MTCNN (facenet-pytorch)

Every reader returns FaceImages: one uint8 tensor [N, C, H, W] with the label, the FER-2013 Usage and the
source name of each image. load_fer2013 and face_folders keep the decoded tensors in a cache, so the second
load of the 32k FER-2013 images takes a fraction of a second instead of decoding 32k JPEGs again.
Input the user can fix raises DataError (one line: the problem and what to do). Problems that cost only a
few images (corrupt files, photos without a face) skip them and warn with a count and the first few names.
"""
from __future__ import annotations

import csv
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
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, ImageOps

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
            raise ValueError(f"FaceImages fields differ in length: {len(self.images)} images, "
                             f"{len(self.labels)} labels, {len(self.usage)} usages, {len(self.files)} files")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> FaceImages:
        """The images at index (an int64 index tensor), in that order."""
        return FaceImages(self.images[index], self.labels[index], self.usage[index],
                          [self.files[i] for i in index.tolist()], self.classes)


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


# ---------------------------------------------------------------- FER-2013 readers

def _fer_layout(names: Iterable[str]) -> list[str]:
    """The names that sit at [top/]<train|test>/<class>/<image>, train first, each part sorted for determinism."""
    keep = []
    for name in names:
        parts = PurePosixPath(name).parts
        # macOS adds .DS_Store, ._<name> copies and, in zips, __MACOSX/: none of them are images.
        if (len(parts) in (3, 4) and parts[-3].lower() in ("train", "test")
                and parts[-1].lower().endswith(IMAGE_SUFFIXES)
                and not any(part.startswith(".") or part == "__MACOSX" for part in parts)):
            keep.append(name)
    return sorted(keep, key=lambda name: (PurePosixPath(name).parts[-3].lower() != "train", name))


def _emotion_id(folder: str, shown: str, where: Path) -> int:
    name = folder.lower()
    name = EMOTION_ALIASES.get(name, name)
    if name not in EMOTIONS:
        raise DataError(f"unknown class folder '{shown}' in {where}: rename it to one of "
                        f"{', '.join(EMOTIONS + tuple(EMOTION_ALIASES))} or remove it")
    return EMOTIONS.index(name)


def _usage_id(file_name: str, split: str) -> int:
    for usage in USAGES[:3]:
        if file_name.startswith(usage + "_"):
            return USAGES.index(usage)
    return USAGES.index("Training" if split.lower() == "train" else "Test")


def _decode_fer(names: list[str], open_image: Callable[[str], Image.Image]) -> tuple[torch.Tensor, list[int]]:
    """Decode to uint8 [N, 1, 48, 48]. Returns the images and the positions in names that could be read."""
    pixels = np.empty((len(names), FER_SIZE, FER_SIZE), np.uint8)
    kept, unreadable, converted = [], [], []
    for i, name in enumerate(names):
        try:
            with open_image(name) as image:
                odd = image.mode != "L" or image.size != (FER_SIZE, FER_SIZE)
                if odd:
                    image = image.convert("L").resize((FER_SIZE, FER_SIZE), Image.BILINEAR)
                pixels[len(kept)] = np.asarray(image)  # decodes here, so a truncated file fails inside the try
        except UNREADABLE:
            unreadable.append(name)
            continue
        kept.append(i)
        if odd:
            converted.append(name)
    _warn_skipped(unreadable, "unreadable images")
    if converted:
        warnings.warn(f"converted {len(converted)} images that were not 48x48 grayscale to 48x48 grayscale: "
                      f"{_first_few(converted)}")
    return torch.from_numpy(pixels[:len(kept)]).unsqueeze(1), kept


def _read_fer_layout(names: list[str], open_image: Callable[[str], Image.Image], where: Path) -> FaceImages:
    if not names:
        raise DataError(f"no images (.jpg, .jpeg, .png) in {where} under train/<class>/ or test/<class>/: "
                        f"{GET_FER2013}")
    labels, usage = [], []
    for name in names:
        split, folder, file_name = PurePosixPath(name).parts[-3:]
        labels.append(_emotion_id(folder, f"{split}/{folder}", where))
        usage.append(_usage_id(file_name, split))
    images, kept = _decode_fer(names, open_image)
    if not kept:
        raise DataError(f"none of the {len(names)} images in {where} could be read: {GET_FER2013} again")
    return FaceImages(images, torch.tensor(labels)[kept], torch.tensor(usage, dtype=torch.int8)[kept],
                      [names[i] for i in kept], EMOTIONS)


def fer2013_folders(root: str | Path) -> FaceImages:
    """Read the Kaggle FER-2013 image folders root/train/<class>/* and root/test/<class>/*."""
    root = _existing(root, GET_FER2013)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: pass the folder that holds train/ and test/")
    names = _fer_layout(path.relative_to(root).as_posix() for path in root.glob("*/*/*"))
    return _read_fer_layout(names, lambda name: Image.open(root / name), root)


def fer2013_zip(path: str | Path) -> FaceImages:
    """Read the FER-2013 image folders straight from the Kaggle .zip (optionally under one top-level folder)."""
    path = _existing(path, GET_FER2013)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise DataError(f"{path} is not a readable zip file: download it again, or unzip it and pass the "
                        f"folder") from None
    with archive:
        names = _fer_layout(archive.namelist())
        return _read_fer_layout(names, lambda name: Image.open(io.BytesIO(archive.read(name))), path)


def fer2013_csv(path: str | Path) -> FaceImages:
    """Read fer2013.csv (emotion,pixels,Usage) or icml_face_data.csv (emotion, Usage, pixels); files are "csv row N".

    Rows are numbered as in a spreadsheet or an editor: the header is row 1.
    """
    path = _existing(path, GET_FER2013)
    labels, usage, pixels, files = [], [], [], []
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet may have added a BOM
            rows = csv.reader(file)
            header = next(rows, None)
            if header is None:
                raise DataError(f"{path} is empty: pass fer2013.csv or icml_face_data.csv (download it again)")
            columns = [name.strip().lower() for name in header]
            if sorted(columns) != ["emotion", "pixels", "usage"]:
                raise DataError(f"{path.name} has the header {textwrap.shorten(','.join(header), 60)!r}, expected the "
                                f"columns emotion, pixels, Usage (any order): pass fer2013.csv or icml_face_data.csv")
            label_at, pixels_at, usage_at = (columns.index(name) for name in ("emotion", "pixels", "usage"))
            label_ids = {str(i) for i in range(len(EMOTIONS))}
            for row in rows:
                if not row:  # blank line, e.g. at the end of the file
                    continue
                where = f"{path.name} row {rows.line_num}"
                if len(row) != 3:
                    raise DataError(f"{where} has {len(row)} fields, expected 3 (emotion, pixels, Usage): "
                                    "fix or delete it")
                label = row[label_at].strip()
                if label not in label_ids:
                    raise DataError(f"{where}: emotion {label!r} is not a label id 0-6 ({', '.join(EMOTIONS)}): "
                                    f"fix or delete it")
                try:  # numpy's C parser: about 2 s for the 35,887 rows, where str.split is 4x slower
                    values = np.fromstring(row[pixels_at], dtype=np.int32, sep=" ")
                except ValueError:  # numpy >= 2; older numpy stops at the text, and the size check below catches it
                    raise DataError(f"{where} has text that is not a number among its pixels: "
                                    "fix or delete it") from None
                if values.size != FER_PIXELS:
                    raise DataError(f"{where} has {values.size} pixel values, expected {FER_PIXELS} (48x48) "
                                    f"separated by spaces: fix or delete it")
                if values.min() < 0 or values.max() > 255:
                    raise DataError(f"{where} has pixel values outside 0-255: fix or delete it")
                name = row[usage_at].strip()
                if name not in USAGES[:3]:
                    raise DataError(f"{where}: Usage {name!r} is not Training, PublicTest or PrivateTest: "
                                    "fix or delete it")
                labels.append(int(label))
                usage.append(USAGES.index(name))
                pixels.append(values.astype(np.uint8))
                files.append(f"csv row {rows.line_num}")
    except (UnicodeDecodeError, csv.Error) as e:  # e.g. a binary file named .csv
        raise DataError(f"{path.name} is not a readable csv text file ({textwrap.shorten(str(e), 60)}): "
                        "pass fer2013.csv or icml_face_data.csv") from None
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
    raise DataError(f"{path} is not a folder, a .zip or a .csv: pass the FER-2013 image folder, the Kaggle .zip "
                    f"or fer2013.csv")


# ---------------------------------------------------------------- decode cache

def _fingerprint(path: Path) -> list:
    """What changes when the data changes: a file's size and mtime; for a folder, those of every folder up to
    two levels down with its entry count (adding, removing or renaming a file changes its folder's mtime)."""
    if path.is_file():
        return [path.stat().st_size, path.stat().st_mtime_ns]
    folders = [path, *sorted(p for p in [*path.glob("*"), *path.glob("*/*")] if p.is_dir())]
    return [(str(folder), len(os.listdir(folder)), folder.stat().st_mtime_ns) for folder in folders]


def _cached(kind: str, path: Path, settings: tuple, cache_dir: str | Path | None,
            read: Callable[[], FaceImages]) -> FaceImages:
    """read() once; later calls load its result from cache_dir while path and settings are unchanged."""
    path = path.resolve()
    key = repr((CACHE_VERSION, kind, str(path), settings, _fingerprint(path)))
    cache_dir = Path(cache_dir or os.environ.get("FACENETS_CACHE") or Path.home() / ".cache" / "facenets").expanduser()
    cache = cache_dir / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if cache.exists():
        try:
            return FaceImages(**torch.load(cache, weights_only=True))
        except Exception as error:  # any damage (truncated, foreign or hand-edited file) only means: decode again
            warnings.warn(f"ignoring the damaged cache {cache} ({type(error).__name__}); decoding the data again")
    data = read()
    # Written under a temporary name, then renamed: a run killed while saving never leaves a half-written cache,
    # and the process id keeps two runs started together from writing into the same temporary file.
    temporary = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(vars(data), temporary)  # a dict of tensors, a list and a tuple of str: safe for weights_only
        os.replace(temporary, cache)
    except (OSError, RuntimeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).strip().splitlines()[0][:100]
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

def stratified_split(labels: torch.Tensor, fractions: list[float], seed: int,
                     min_per_class: int = 0) -> list[torch.Tensor]:
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
        share[:min(min_per_class, len(members) // 2)] -= 1  # sorts before every other image, into the first part
        quantile[members] = share
    order = shuffled[quantile[shuffled].sort(stable=True).indices]  # ties in shuffled order: no class goes first
    ends = [round(sum(fractions[:i + 1]) * len(labels)) for i in range(len(fractions))]
    return [order[start:end].sort().values for start, end in zip([0] + ends, ends)]


def split_indices(data: FaceImages, protocol: str = "official", val_fraction: float = 0.0,
                  seed: int = 0) -> dict[str, torch.Tensor]:
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
            raise DataError("this copy of FER-2013 has no PrivateTest images (only the PublicTest half of the test "
                            "set): use --split official")
    elif protocol == "monterrey":
        train, val = stratified(training, [20099 / 28709, 2151 / 28709])
        test = not_training
    elif protocol == "udine":
        train, val, test = stratified(everything, [0.70, 0.15, 0.15])
    else:
        train, test = stratified(everything, [0.70, 0.30], min_per_class=50)
        val = torch.zeros(0, dtype=torch.int64)
    if len(train) == 0:
        raise DataError(f"split {protocol} leaves no training images: the data has no Training images "
                        f"(check the train/ folder or the csv's Usage column), or use --split udine or utec")
    return {"train": train, "val": val, "test": test}


# ---------------------------------------------------------------- synthetic faces

# One row per emotion, in EMOTIONS order: how each expression bends the cartoon face.
#   curve: mouth corners up (+) or down (-)   open: mouth opening   tilt: one mouth corner higher (asymmetry)
#   width: mouth half-width   brow_tilt: inner brow ends down (+) or up (-)   brow_up: brows raised   eyes: eye opening
_EXPRESSIONS = torch.tensor([
    # curve  open  tilt  width brow_tilt brow_up eyes
    [-0.06, 0.00, 0.00, 0.20, 0.18, -0.04, 0.5],  # angry: brows down inside, narrow eyes, pressed mouth
    [-0.08, 0.02, 0.20, 0.22, 0.05, 0.00, 0.4],  # disgust: crooked mouth, squint
    [0.00, 0.09, 0.00, 0.28, -0.08, 0.10, 1.5],  # fear: wide eyes, flat open mouth, brows up inside
    [0.16, 0.02, 0.00, 0.28, 0.00, 0.00, 0.9],  # happy: smile
    [-0.16, 0.00, 0.00, 0.22, -0.12, 0.02, 0.8],  # sad: frown, brows up inside
    [0.00, 0.18, 0.00, 0.12, 0.00, 0.14, 1.5],  # surprise: round open mouth, raised brows, wide eyes
    [0.00, 0.00, 0.00, 0.22, 0.00, 0.00, 1.0],  # neutral
])


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
        column.view(n, 1, 1) for column in _EXPRESSIONS[labels].T)
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
    mouth_y = 0.45 + curve * (1 - 2 * along ** 2) + tilt * along
    mouth_half_height = 0.045 + mouth_open * (1 - along ** 2)
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
    usage[:round((1 - test_fraction) * n)] = USAGES.index("Training")
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
        return ImageOps.exif_transpose(stored).convert("RGB")


def detect_faces(image: Image.Image, device: str = "cpu") -> list[tuple[float, float, float, float]]:
    """Boxes (x0, y0, x1, y1) of the faces MTCNN finds in image, biggest first; [] when there is none."""
    if min(image.size) < 20:  # smaller than MTCNN's smallest face (min_face_size=20), on which its detect fails
        return []
    boxes, _ = _mtcnn(str(device)).detect(image.convert("RGB"))
    if boxes is None:
        return []
    found = [tuple(float(v) for v in box) for box in boxes]
    return sorted(found, key=lambda box: (box[2] - box[0]) * (box[3] - box[1]), reverse=True)


def crop_face(image: Image.Image, box: tuple[float, float, float, float], size: int = 48, grayscale: bool = True,
              margin: float = 0.1) -> torch.Tensor:
    """The square around box, widened by margin (a fraction of the box) on each side, as uint8 [C, size, size].

    Square, so the face is not stretched; parts beyond the photo's edge are black.
    """
    x0, y0, x1, y1 = box
    half = max(x1 - x0, y1 - y0) * (0.5 + margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    square = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    crop = image.convert("L" if grayscale else "RGB").crop(square).resize((size, size), Image.BILINEAR)
    pixels = torch.from_numpy(np.array(crop))
    return pixels.unsqueeze(0) if grayscale else pixels.permute(2, 0, 1).contiguous()


def _crop_face_folders(root: Path, size: int, grayscale: bool, classes: tuple[str, ...] | None,
                       device: str) -> FaceImages:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = tuple(folder.name for folder in folders)
    photos = []
    for folder in folders:
        name = folder.name if folder.name in classes else EMOTION_ALIASES.get(folder.name.lower(), folder.name.lower())
        if name not in classes:
            accepted = classes + tuple(a for a, c in EMOTION_ALIASES.items() if c in classes)
            raise DataError(f"unknown class folder '{folder.name}' in {root}: rename it to one of "
                            f"{', '.join(accepted)} or remove it")
        photos += [(classes.index(name), path) for path in sorted(folder.iterdir())
                   if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")]
    if not photos:
        raise DataError(f"no photos (.jpg, .jpeg, .png) in {root}/<class>/: put each class's photos in its own folder")
    crops, labels, files, unreadable, faceless = [], [], [], [], []
    for label, path in photos:
        name = path.relative_to(root).as_posix()
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
        labels.append(label)
        files.append(name)
    _warn_skipped(unreadable, "unreadable photos")
    _warn_skipped(faceless, "photos where no face was found")
    if not crops:
        raise DataError(f"no face found in any of the {len(photos)} photos in {root}: use photos where a face is "
                        f"clearly visible")
    usage = torch.full((len(crops),), USAGES.index("Training"), dtype=torch.int8)
    return FaceImages(torch.stack(crops), torch.tensor(labels), usage, files, classes)


def face_folders(root: str | Path, size: int = 48, grayscale: bool = True, classes: tuple[str, ...] | None = None,
                 cache_dir: str | Path | None = None, device: str = "cpu") -> FaceImages:
    """The biggest face of each photo in root/<class>/*, cropped with MTCNN; cached like load_fer2013.

    classes: the accepted folder names, in label order (EMOTIONS also accepts disgusted, fearful, surprised);
    None takes the folder names, sorted. Photos without a face or that cannot be read are skipped with a warning.
    All images get Usage "Training": split them with a pooled protocol such as utec.
    """
    root = _existing(root, "put the photos in one folder per class, root/<class>/")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: put the photos in one folder per class, root/<class>/")
    classes = None if classes is None else tuple(classes)
    return _cached("faces", root, (size, grayscale, classes), cache_dir,
                   lambda: _crop_face_folders(root, size, grayscale, classes, str(device)))
