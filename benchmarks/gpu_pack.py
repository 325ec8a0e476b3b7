"""Pack the data sets for the GPU suite, one .tar.gz per data set, each small enough to travel with the working tree.

    make gpu-pack DATA=../shared/data     # .data/fer2013.tar.gz, .data/utkface-64.tar.gz, .data/celeba-faces-64.tar.gz
    make gpu-suite ARGS="--part attributes --pack .data/utkface-64.tar.gz"    # the suite unpacks it and runs the part

fer2013 (parts emotion and reports): the image folders as they are. utkface (part attributes) and celeba-faces (part
gan): every image cut to its centre square and resized to --size pixels, the size the recipes train at, with the
filter the readers use, then saved as JPEG at --quality under its own name (UTKFace's names hold its labels). Each pack
holds its data set's folder, so unpacked it is laid out as in DATA. A pack over --limit MiB is named as too big:
a GPU machine takes at most 64 MiB of files per run, the working tree included.
"""

import io
import sys
import tarfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is not a package
from facenets import runs  # noqa: E402
from facenets.data import IMAGE_SUFFIXES  # noqa: E402

DATA_SETS = {"fer2013": "emotion, reports", "utkface": "attributes", "celeba-faces": "gan"}
AS_THEY_ARE = {"fer2013"}  # 48x48 already: re-encoding would only lose detail


def build_parser():
    p = runs.FlagParser(__doc__)
    p.add_argument("--data", default="data", help="the folder holding fer2013/, utkface/ and celeba-faces/")
    p.add_argument(
        "--out",
        default=".data",
        help="folder for the packs (.data/ is git-ignored: name a pack in the device tool's carry list)",
    )
    p.add_argument("--sets", nargs="+", default=list(DATA_SETS), choices=DATA_SETS, help="the data sets to pack")
    p.add_argument("--size", type=int, default=64, help="side in pixels of the resized utkface and celeba-faces images")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the resized images")
    p.add_argument("--limit", type=float, default=58, help="MiB a pack may take")
    return p


def resized_jpeg(path: Path, size: int, quality: int) -> bytes:
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)  # the centre square, as the readers cut it
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def pack(source: Path, target: Path, size: int | None, quality: int) -> int:
    """source's files into target (a .tar.gz under source's folder name), images resized unless size is None;
    the number of files."""
    files = sorted(path for path in source.rglob("*") if path.is_file())
    with tarfile.open(target, "w:gz") as archive:
        for path in files:
            name = f"{source.name}/{path.relative_to(source).as_posix()}"
            if size is None or path.suffix.lower() not in IMAGE_SUFFIXES:
                archive.add(path, arcname=name)
                continue
            try:
                data = resized_jpeg(path, size, quality)
            except OSError as e:  # kept as it is: the reader skips it with its warning, as it would the original
                print(f"warning: {path} kept as it is, unreadable ({e})", file=sys.stderr)
                archive.add(path, arcname=name)
                continue
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), int(path.stat().st_mtime)
            archive.addfile(info, io.BytesIO(data))
    return len(files)


def main(argv=None):
    args = build_parser().parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    missing = [name for name in args.sets if not (data / name).is_dir()]
    if missing:
        print(
            f"error: no {', '.join(missing)} folder in {data}: pass --data the folder holding them, or --sets the "
            f"ones it has",
            file=sys.stderr,
        )
        return 2
    if args.size <= 0 or not 1 <= args.quality <= 100:
        print("error: --size must be above 0 and --quality from 1 to 100", file=sys.stderr)
        return 2
    too_big = []
    try:
        runs.make_folder(out)
        for name in args.sets:
            size = None if name in AS_THEY_ARE else args.size
            target = out / (f"{name}.tar.gz" if size is None else f"{name}-{size}.tar.gz")
            print(f"packing {data / name} ...", flush=True)
            counted = []  # written under a temporary name, renamed when whole: a stopped pack leaves no half file
            runs.replace_atomically(target, lambda tmp: counted.append(pack(data / name, tmp, size, args.quality)))
            mib = target.stat().st_size / 2**20
            print(f"{target}: {mib:.1f} MiB, {counted[0]:,} files, for the part(s) {DATA_SETS[name]}")
            too_big += [f"{target} ({mib:.1f} MiB)"] if mib > args.limit else []
    except runs.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if too_big:
        print(
            f"error: over --limit {args.limit:g} MiB: {', '.join(too_big)}; lower --size or --quality", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
