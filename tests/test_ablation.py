"""benchmarks/ablate_emotion.py: a CPU smoke ablation end to end, and a variant whose runs fail."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "ablate_emotion.py"


def test_small_ablation_prints_a_table_of_both_variants(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--parallel", "2", "--out", str(tmp_path / "abl")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert sorted(results) == ["no_mixup-seed0", "recipe-seed0"]
    assert (
        results["no_mixup-seed0"]["command"].split().count("--mixup") == 1
    )  # the variant's flag reached train_emotion
    table = done.stdout[done.stdout.index("| variant") :].splitlines()
    assert [row.split("|")[1].strip() for row in table[2:]] == [
        "recipe",
        "no mixup",
        "recipe, tested without TTA",
        "recipe, tested without EMA",
    ]
    accuracy = float(table[2].split("|")[5].split("%")[0])
    assert 0 < accuracy <= 100


def test_failed_runs_are_named_and_the_exit_code_says_so(tmp_path):
    # A train_emotion flag that cannot work makes every run fail: the script must say which and where the log is.
    done = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--small",
            "--variants",
            "recipe",
            "--out",
            str(tmp_path / "abl"),
            "--",
            "--crop",
            "99",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "recipe-seed0: failed" in done.stdout and "recipe-seed0.log" in done.stdout
    assert "--crop must be between" in (tmp_path / "abl" / "recipe-seed0.log").read_text()


def test_every_variant_is_a_valid_train_emotion_command():
    sys.path.insert(0, str(SCRIPT.parent))
    import ablate_emotion

    import train_emotion

    for variant, flags in ablate_emotion.VARIANTS.items():
        args = train_emotion.parse_args(["--data", "synthetic", *flags])  # exits (fails the test) on a bad combination
        assert args.data == "synthetic", variant
    assert set(ablate_emotion.DEFAULT_VARIANTS) <= set(ablate_emotion.VARIANTS)


def test_table_of_runs_without_validation_and_small_flags_kept_beside_extra_ones():
    sys.path.insert(0, str(SCRIPT.parent))
    import ablate_emotion

    results = {
        "recipe-seed0": {"variant": "recipe", "best_val_accuracy": None, "test_accuracy": 0.5, "train_seconds": 3.0}
    }
    row = ablate_emotion.table(results, ["recipe"]).splitlines()[2]
    assert "| none | 50.00% |" in row
    args = ablate_emotion.parse_args(["--small", "--", "--device", "cpu"])
    assert args.extra == [*ablate_emotion.SMALL["extra"], "--device", "cpu"]


def test_the_same_command_continues_an_ablation(tmp_path):
    # A first ablation of one variant, then a cut-short state: the second run lost its results.json entry and
    # metrics.json but kept last.pt (as after Ctrl-C), and a third run left only a folder with nothing to resume.
    out = tmp_path / "abl"
    small = [sys.executable, str(SCRIPT), "--small", "--parallel", "2", "--out", str(out)]
    first = subprocess.run([*small, "--variants", "recipe", "no mixup"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    results = json.loads((out / "results.json").read_text())
    kept = results["recipe-seed0"]
    del results["no_mixup-seed0"]
    (out / "results.json").write_text(json.dumps(results))
    (out / "no_mixup-seed0" / "metrics.json").unlink()
    (out / "no_label_smoothing-seed0").mkdir()
    (out / "no_label_smoothing-seed0" / "config.json").write_text("{}")

    again = subprocess.run(
        [*small, "--variants", "recipe", "no mixup", "no label smoothing"], capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout + again.stderr
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == ["no_label_smoothing-seed0", "no_mixup-seed0", "recipe-seed0"]
    assert results["recipe-seed0"] == kept  # not run again
    assert "recipe-seed0:" not in again.stdout and "no_mixup-seed0: validation" in again.stdout
    assert "resuming" in (out / "no_mixup-seed0.log").read_text()
    assert "| no label smoothing |" in again.stdout


def test_an_out_folder_of_other_settings_is_refused_in_one_line(tmp_path):
    out = tmp_path / "abl"
    out.mkdir()
    small = [sys.executable, str(SCRIPT), "--small", "--variants", "recipe", "--out", str(out)]
    (out / "results.json").write_text(json.dumps({"recipe-seed0": {"variant": "recipe"}}))
    (out / "recipe-seed0.flags").write_text("--epochs 3")
    done = subprocess.run(small, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "recipe-seed0 was run with other flags (--epochs 3, now --data synthetic" in done.stderr
    assert "pick a new --out" in done.stderr
    # a stopped run (last.pt, no result yet) is not continued with other flags either
    (out / "results.json").unlink()
    (out / "recipe-seed0").mkdir()
    (out / "recipe-seed0" / "last.pt").write_bytes(b"")
    done = subprocess.run(small, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "was run with other flags (--epochs 3, now" in done.stderr
    (out / "results.json").write_text("{not json")
    done = subprocess.run(small, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot be read" in done.stderr and "Traceback" not in done.stderr


def test_an_out_that_is_a_file_or_holds_foreign_results_is_one_line(tmp_path, capsys):
    sys.path.insert(0, str(SCRIPT.parent))
    import ablate_emotion

    (tmp_path / "afile").write_text("mine")
    assert ablate_emotion.main(["--small", "--out", str(tmp_path / "afile")]) == 2
    assert "cannot make the folder" in capsys.readouterr().err and (tmp_path / "afile").read_text() == "mine"
    (tmp_path / "abl").mkdir()
    (tmp_path / "abl" / "results.json").write_text("[1, 2]")  # JSON, but not an ablation's
    assert ablate_emotion.main(["--small", "--out", str(tmp_path / "abl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not an ablation's results" in err[0]


def test_help_says_each_default_once():
    # --epochs printed "(default: the recipe's) (default: None)"
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    epochs = " ".join(done.stdout.split("\n  --epochs EPOCHS")[1].split("\n  --")[0].split())
    assert done.returncode == 0 and epochs.count("default") == 1, epochs
