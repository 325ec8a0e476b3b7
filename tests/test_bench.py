"""benchmarks/bench_emotion.py: the CPU smoke run end to end, its JSON, and a missing data set.
benchmarks/overhead_emotion.py: its counters, its smoke run on two checkouts, and the syncs of train_emotion's loop."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_emotion.py"
OVERHEAD = ROOT / "benchmarks" / "overhead_emotion.py"


def load_script(path):
    # benchmarks/ is not a package, so the script is loaded from its file.
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return load_script(SCRIPT)


def last_word(stdout, start):
    """The last word of the printed line that begins with start, e.g. its images/s."""
    return next(line.split()[-1] for line in stdout.splitlines() if line.startswith(start))


def test_small_run_times_both_loops_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    # Run from another folder as a user would: the script must find train_emotion and facenets by itself.
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--small", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    assert (
        load_bench().main(
            ["--small", "--model", "rna_cifar", "--steps", "1", "--warmup", "0", "--workers", "0", "--epochs", "0"]
        )
        == 0
    )
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


# ----------------------------------------------------------------------------- overhead_emotion.py


def test_sync_counter_counts_each_way_of_reading_a_tensor_once_at_its_place():
    overhead, t = load_script(OVERHEAD), torch.arange(3.0)
    item = torch.Tensor.item
    with overhead.SyncCounter() as syncs:
        t.sum().item(), float(t[0]), int(t[0]), bool(t[0] > 0), t.tolist(), t.cpu(), t.numpy()
        f"{t[1]:.1f}", repr(t)  # each reads values inside with other methods: counted once
        t + 1, t.view(3, 1), t.to(torch.float64)  # stay tensors: no sync
    assert [name for _, name, _ in syncs.events] == [
        "item",
        "__float__",
        "__int__",
        "__bool__",
        "tolist",
        "cpu",
        "numpy",
        "__format__",
        "__repr__",
    ]
    assert {place.split(":")[0] for _, _, place in syncs.events} == {"test_bench.py"}
    assert torch.Tensor.item is item  # put back on leaving


def test_op_counter_sees_backward_and_the_syncs_hidden_in_operators():
    overhead = load_script(OVERHEAD)
    x = torch.rand(8, requires_grad=True)
    with overhead.OpCounter() as ops:
        (x * 2).sum().backward()
        x[x > 0.5], torch.nonzero(x), x[torch.tensor([0, 1])]  # the last indexes by position: no sync
    assert len(ops.ops) >= 4  # mul, sum, and the backward's own operators
    assert [name for _, name, _ in ops.events] == ["index", "nonzero"]


def test_small_overhead_run_measures_two_checkouts_alike(tmp_path):
    out = tmp_path / "overhead.json"
    # Run from another folder as a user would; the same checkout twice, each in its own process.
    done = subprocess.run(
        [sys.executable, str(OVERHEAD), "--small", "--code", str(ROOT), str(ROOT), "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    first, second = json.loads(out.read_text())
    assert first["ms_per_step"][0] > 0 and second["ms_per_step"][0] > 0
    # Counts are decided by the code, not the clock: the same in both processes
    assert first["steps"] == second["steps"] == 55  # one epoch of 896 Training faces at batch 16, from step 1 to 56
    assert first["syncs"] == second["syncs"] and first["ops_per_step"] == second["ops_per_step"] > 100
    assert sum(line.endswith(str(ROOT)) for line in done.stdout.splitlines()) == 2


def test_a_second_checkout_is_refused_in_the_same_process(tmp_path, monkeypatch):
    overhead = load_script(OVERHEAD)
    monkeypatch.setattr(sys, "path", list(sys.path))
    overhead.import_from(ROOT)
    with pytest.raises(SystemExit, match="already imported from"):
        overhead.import_from(tmp_path)


# One sync per epoch of the recipe (56 steps at batch 512), to read its loss and accuracy at once, is all the loop
# needs, and one per look of the progress bar (runs.SHOW_EVERY steps) where it shows. Measured at 9f5144c: 6 in 56
# steps, all .item(): the progress bar read the loss and the accuracy one after the other every 20 steps
# (train_emotion.py:463), shown or not, and the epoch's end read them one after the other (:467).
@pytest.mark.parametrize("bar", [False, True])
def test_the_step_loop_syncs_with_the_device_once_an_epoch_and_once_per_look_of_the_bar(monkeypatch, bar):
    overhead = load_script(OVERHEAD)
    train_emotion = overhead.import_from(ROOT)
    # A save syncs too, every 30 s: a slow machine would have more. For this test only, as the benchmark does.
    monkeypatch.setattr(train_emotion.runs, "SAVE_EVERY", float("inf"))
    real_tqdm = train_emotion.runs.tqdm
    monkeypatch.setattr(train_emotion.runs, "tqdm", lambda *a, **k: real_tqdm(*a, **{**k, "disable": not bar}))
    syncs, ops = overhead.SyncCounter(), overhead.OpCounter()
    steps = overhead.train(
        train_emotion,
        ["--width", "4", "--batch-size", "16", "--synthetic-count", "1120", "--epochs", "2"],
        (syncs, ops),
    )
    last = overhead.last_step(len(steps), 2)  # 56 steps, from the first step of epoch 1 to the first of epoch 2
    found = overhead.by_place(syncs.events, 1, last) + overhead.by_place(ops.events, 1, last)
    looks = (last - 1) // train_emotion.runs.SHOW_EVERY if bar else 0
    assert sum(found.values()) <= 1 + looks, dict(found)


# ----------------------------------------------------------------------------- bench_ensemble.py

ENSEMBLE = ROOT / "benchmarks" / "bench_ensemble.py"


def test_the_three_ways_of_an_ensemble_train_the_same_networks():
    bench, cpu = load_script(ENSEMBLE), torch.device("cpu")
    x, y = torch.rand(2, 8, 1, bench.CROP, bench.CROP), torch.randint(bench.CLASSES, (2, 8))
    # The same initial weights for each way; two steps, so that the second loss also checks the first update
    losses = {
        way: [trainer.step(x, y) for trainer in [make(bench.make_networks(2, width=4), cpu)] for _ in range(2)]
        for way, make in bench.WAYS.items()
    }
    assert losses["stacked"][0].shape == (2,) and not torch.equal(losses["stacked"][0], losses["stacked"][1])
    for way in ("vmap", "separate"):
        # float32 sums taken in another order differ by ~1e-6; members swapped or mixed would differ by ~1e-2
        torch.testing.assert_close(torch.stack(losses[way]), torch.stack(losses["stacked"]), rtol=0, atol=1e-4)


def test_small_ensemble_bench_prints_every_way(capsys):
    assert load_script(ENSEMBLE).main(["--small"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[3:]}
    assert set(rows) == {"plain", "stacked", "vmap", "separate"} and rows["plain"][-1] == "1.00x"
    assert all(float(row[-1].rstrip("x")) > 0 for row in rows.values())
