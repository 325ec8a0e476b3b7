"""benchmarks/gpu_suite.py and gpu_pack.py: every part end to end with --small, stopping and resuming a row, packs the
readers read back, and bad input in one line."""

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from facenets import data  # noqa: E402


def load(name):
    # benchmarks/ is not a package, so each script is loaded from its file.
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite, packer = load("gpu_suite"), load("gpu_pack")


def table_rows(text):
    return [
        [cell.strip() for cell in line.split("|")[1:-1]]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith(("| row", "| run"))
    ]


def test_small_runs_every_part_and_prints_every_table(tmp_path):
    out = tmp_path / "suite"
    # Run from another folder as a user would: the script must find the training scripts by itself.
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--small", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "FACENETS_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    expected = {"smoke": 10, "emotion": 4, "attributes": 2, "gan": 2, "reports": 2}
    for part, count in expected.items():
        text = (out / f"{part}.md").read_text()
        assert text in done.stdout, part
        rows = table_rows(text)
        assert len(rows) == count, (part, rows)
        for row in rows:  # every row finished: a wall time and a result
            assert row[1].endswith(" s") and row[3] not in ("", "-"), (part, row)
    smoke = {row[0]: row for row in table_rows((out / "smoke.md").read_text())}
    for task in ("emotion", "attributes", "gan"):
        assert f"{task}: an epoch, bf16 (--small: the fp32 and --compile rows are GPU only)" in smoke
        assert "resumed with: train_" in smoke[f"{task}: stopped by SIGTERM in epoch 2, then --resume"][4]
        assert (out / "smoke" / f"{task}-resumed" / "metrics.json").is_file()
        assert "stopped in epoch 2" in (out / "smoke" / f"{task}-resumed.log").read_text()  # by the SIGTERM
    assert "wrote 16 images" in smoke["gan: --sample 16"][3]
    assert "annotated copy" in smoke["emotion: --predict, MTCNN on cpu"][3]
    assert "members" in smoke["emotion: --ensemble 2, an epoch, bf16"][4]
    emotion = (out / "emotion.md").read_text()
    assert [row[0] for row in table_rows(emotion)][-1] == "bench_emotion.py" and "--once:" in emotion
    gan = table_rows((out / "gan.md").read_text())
    assert all(row[3].startswith("Frechet") for row in gan)  # facenet-pytorch is installed here: quality measured
    assert [row[0].split(",")[0] for row in table_rows((out / "reports.md").read_text())] == ["Udine R1", "Udine R2"]


def test_the_gpu_rows_are_the_full_ones(tmp_path):
    """Without --small: every row on CUDA or compiled, the fp32 and the bf16 --compile rows apart, no --dry-run."""
    smoke = suite.smoke_rows(False, tmp_path)
    assert len(smoke) == 13 and all("cuda" in row.flags for row in smoke)
    assert sum("--compile" in row.flags for row in smoke) == 3 and not any("--dry-run" in row.flags for row in smoke)
    assert "emotion-fp32" in str(next(row for row in smoke if row.name == "emotion-predict").flags)
    for part in ("attributes", "gan", "reports"):
        rows = suite.part_rows(part, False, tmp_path)
        assert all(row.flags[-1] == "--compile" and "synthetic" not in row.flags for row in rows), part


def fake_training(tmp_path, body):
    """A stand-in training script: it writes its progress bar as train_*.py does, then runs body."""
    script = tmp_path / "fake_train.py"
    script.write_text(
        "import signal, sys, time\nfrom pathlib import Path\n"
        "run = Path(sys.argv[sys.argv.index('--out') + 1]) / sys.argv[sys.argv.index('--name') + 1]\n"
        "run.mkdir(parents=True, exist_ok=True)\n" + body
    )
    return suite.Row("fake", "fake", str(script), [])  # an absolute path: script() joins it to nothing


# --small runs each training in a fork of the suite's process, the GPU in a new process: both must stop alike
forked = pytest.mark.parametrize("fork", [False, True], ids=["process", "fork"])


@forked
def test_a_training_that_saves_on_sigterm_is_stopped_in_epoch_2(tmp_path, monkeypatch, fork):
    monkeypatch.setattr(suite.gpu_evidence, "FORK", fork)
    row = fake_training(  # the line that ends epoch 1, unflushed: a log gets each line as it is printed
        tmp_path,
        "def stop(*_):\n    (run / 'last.pt').write_text('x'); sys.exit(130)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('epoch   1  train loss 2.0'); time.sleep(60)\n",
    )
    assert suite.stop_in_second_epoch(row, tmp_path, suite.time.monotonic() + 60) is None
    assert (tmp_path / "fake" / "last.pt").is_file()


@forked
def test_a_training_that_dies_on_sigterm_is_a_failed_row(tmp_path, monkeypatch, fork):
    monkeypatch.setattr(suite.gpu_evidence, "FORK", fork)
    row = fake_training(tmp_path, "print('epoch 2/3', flush=True); time.sleep(60)\n")
    why = suite.stop_in_second_epoch(row, tmp_path, suite.time.monotonic() + 60)
    assert why == f"SIGTERM in epoch 2: exit -{int(suite.signal.SIGTERM)}, last.pt missing"
    row.kind = "stop"
    (tmp_path / "again").mkdir()
    assert suite.run_row(row, tmp_path / "again", suite.time.monotonic() + 60)["failed"]  # a failed row, not a crash


def test_a_finished_row_is_kept_and_not_run_again(tmp_path):
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text("{}")
    row = suite.Row("done", "done", "no_such_script.py", [])
    assert suite.train(row, tmp_path, suite.time.monotonic() + 60) is None
    assert not (tmp_path / "done.log").exists()


def test_a_gan_row_without_quality_says_why():
    shown, notes = suite.summary(suite.Row("g", "g", "train_gan.py", []), {"quality": None, "epochs_run": 7})
    assert shown.startswith("quality not measured") and notes.startswith("7 epochs")


def write_data_sets(root):
    """A few images of each data set in its exact layout."""
    for part, usage in (("train", "Training"), ("test", "PublicTest")):
        for i, emotion in enumerate(("happy", "sad")):
            (root / "fer2013" / part / emotion).mkdir(parents=True)
            Image.new("L", (48, 48), 40 * i + 60).save(root / "fer2013" / part / emotion / f"{usage}_{i}.jpg")
    (root / "utkface" / "crop_part1").mkdir(parents=True)
    for i, name in enumerate(("25_0_0_20170116174525125", "61_1_2017010914240807", "3_1_2_20161219140721987")):
        Image.new("RGB", (200, 200), (50 * i, 90, 120)).save(root / "utkface" / "crop_part1" / f"{name}.jpg.chip.jpg")
    (root / "celeba-faces").mkdir()
    for i in range(3):
        Image.new("RGB", (80, 80), (70, 60 * i, 30)).save(root / "celeba-faces" / f"{182638 + i}.jpg")


def test_packs_unpack_into_what_the_readers_read(tmp_path, monkeypatch, capsys):
    write_data_sets(tmp_path / "data")
    assert packer.main(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "packs")]) == 0
    printed = capsys.readouterr().out
    for name in ("fer2013.tar.gz", "utkface-64.tar.gz", "celeba-faces-64.tar.gz"):
        assert f"{tmp_path / 'packs' / name}: " in printed and " MiB, " in printed
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cache = tmp_path / "cache"
    fer = data.load_fer2013(suite.unpack(tmp_path / "packs" / "fer2013.tar.gz") / "fer2013", cache_dir=cache)
    assert len(fer.labels) == 4
    unpacked = suite.unpack(tmp_path / "packs" / "fer2013.tar.gz") / "fer2013" / "train" / "happy" / "Training_0.jpg"
    assert unpacked.read_bytes() == (tmp_path / "data" / "fer2013" / "train" / "happy" / "Training_0.jpg").read_bytes()
    with pytest.warns(UserWarning, match="61_1_2017010914240807"):  # a name with a field missing: skipped, as before
        utkface = data.load_utkface(suite.unpack(tmp_path / "packs" / "utkface-64.tar.gz") / "utkface", cache_dir=cache)
    assert tuple(utkface.images.shape) == (2, 3, 64, 64)
    faces = suite.unpack(tmp_path / "packs" / "celeba-faces-64.tar.gz") / "celeba-faces"
    assert {Image.open(path).size for path in faces.iterdir()} == {(64, 64)}
    assert len(data.load_face_images(faces, cache_dir=cache).images) == 3


def test_bad_input_is_one_line(tmp_path, capsys):
    assert packer.main(["--data", str(tmp_path), "--out", str(tmp_path / "packs")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    write_data_sets(tmp_path / "data")
    assert (
        packer.main(
            ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "p"), "--sets", "utkface", "--limit", "0"]
        )
        == 1
    )
    assert "over --limit 0 MiB" in capsys.readouterr().err
    (tmp_path / "bad.tar.gz").write_text("not a pack")
    assert suite.main(["--pack", str(tmp_path / "bad.tar.gz"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: cannot unpack --pack")


def test_a_part_without_its_data_set_says_so_in_its_table(tmp_path, capsys):
    assert suite.main(["--part", "attributes", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert "not run: no utkface in" in (tmp_path / "o" / "attributes.md").read_text()


@pytest.mark.skipif(not os.environ.get("FACENETS_DATA"), reason="needs FACENETS_DATA (the real data sets)")
def test_the_real_utkface_pack_fits_and_reads_as_the_folder_does(tmp_path, monkeypatch):
    root = Path(os.environ["FACENETS_DATA"])
    if not (root / "utkface").is_dir():
        pytest.skip(f"no utkface in {root}")
    assert packer.main(["--data", str(root), "--out", str(tmp_path), "--sets", "utkface"]) == 0
    assert (tmp_path / "utkface-64.tar.gz").stat().st_size <= 58 * 2**20
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    faces = data.load_utkface(suite.unpack(tmp_path / "utkface-64.tar.gz") / "utkface", cache_dir=tmp_path / "cache")
    assert len(faces.images) == 9778  # as read from the folder: the two malformed names skipped
