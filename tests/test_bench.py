"""benchmarks/bench_emotion.py: the CPU smoke run end to end, its JSON, and a missing data set."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_emotion.py"


def load_bench():
    # benchmarks/ is not a package, so the script is loaded from its file.
    spec = importlib.util.spec_from_file_location("bench_emotion", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_word(stdout, start):
    """The last word of the printed line that begins with start, e.g. its images/s."""
    return next(line.split()[-1] for line in stdout.splitlines() if line.startswith(start))


def test_small_run_times_both_loops_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    # Run from another folder as a user would: the script must find train_emotion and facenets by itself.
    done = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert float(last_word(done.stdout, "facenets (")) > 0
    assert float(last_word(done.stdout, "reference (DataLoader, 2 workers)")) > 0
    assert float(last_word(done.stdout, "ratio facenets / reference").rstrip("x")) > 0
    assert "device cpu" in done.stdout and "70%:" in done.stdout and "72%:" in done.stdout

    result = json.loads(out.read_text())
    assert result["images_per_second"]["facenets"] > 0 and result["images_per_second"]["reference"] > 0
    timed = result["time_to_accuracy"]
    assert set(timed["reached"]) == {"0.70", "0.72"}
    assert 0 <= timed["final_accuracy"] <= 1 and timed["train_seconds"] > 0
    assert [h["epoch"] for h in timed["history"]] == [1, 2]


def test_a_model_whose_head_depends_on_the_image_size_is_built_for_the_crops(tmp_path, capsys):
    # rna_cifar flattens its last map, so a model built for 48x48 images fails on the recipe's 40x40 crops
    assert load_bench().main(["--small", "--model", "rna_cifar", "--steps", "1", "--warmup", "0", "--workers", "0",
                              "--epochs", "0"]) == 0
    assert "ratio facenets / reference" in capsys.readouterr().out


def test_missing_data_is_one_line_and_exit_2(tmp_path, capsys):
    assert load_bench().main(["--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "FER-2013" in err[0]


def test_help_documents_every_flag():
    assert not [a.option_strings for a in load_bench().build_parser()._actions if not a.help]


def test_an_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench.train_emotion, "load_faces", lambda cfg: pytest.fail("measured before checking --out"))
    (tmp_path / "afile").write_text("mine")
    assert bench.main(["--small", "--out", str(tmp_path / "afile" / "bench.json")]) == 2
    assert "cannot make the folder" in capsys.readouterr().err
    assert bench.main(["--small", "--out", str(tmp_path)]) == 2
    assert "is a folder: name the JSON file" in capsys.readouterr().err
