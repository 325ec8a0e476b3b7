import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from facenets import metrics

# Four classes; class 3 never occurs and is never predicted.
PRED = [0, 0, 1, 2, 2, 2, 0, 1]
TARGET = [0, 0, 1, 1, 2, 2, 2, 2]
CM = [[2, 0, 0, 0], [0, 1, 1, 0], [1, 1, 2, 0], [0, 0, 0, 0]]

# Udine report, R1: correct and wrong predictions per class and the accuracies it prints.
UDINE = {
    "rage": (358, 385, 0.481830),
    "disgust": (41, 41, 0.500000),
    "fear": (339, 429, 0.441406),
    "happiness": (1104, 244, 0.818991),
    "sadness": (460, 451, 0.504940),
    "surprise": (439, 162, 0.730449),
    "neutral": (538, 392, 0.578495),
}


def udine_matrix():
    k = len(UDINE)
    cm = torch.zeros(k, k, dtype=torch.long)
    for i, (correct, wrong, _) in enumerate(UDINE.values()):
        cm[i, i] = correct
        cm[i, (i + 1) % k] = wrong - wrong // 3  # errors anywhere off the diagonal
        cm[i, (i + 3) % k] = wrong // 3
    return cm


def test_confusion_matrix_by_hand():
    cm = metrics.confusion_matrix(torch.tensor(PRED), torch.tensor(TARGET), 4)
    assert cm.dtype == torch.long and cm.tolist() == CM
    logits = torch.nn.functional.one_hot(torch.tensor(PRED), 4).float()
    assert metrics.confusion_matrix(logits, TARGET, 4).tolist() == CM


def test_scores_by_hand():
    assert metrics.accuracy(CM) == pytest.approx(5 / 8)
    recall = metrics.per_class_accuracy(CM)
    assert recall[:3].tolist() == pytest.approx([1, 1 / 2, 1 / 2]) and math.isnan(recall[3])
    assert metrics.mean_per_class_accuracy(CM) == pytest.approx(2 / 3)
    s = metrics.precision_recall_f1(CM)
    assert s["precision"] == pytest.approx([2 / 3, 1 / 2, 2 / 3, 0])
    assert s["recall"] == pytest.approx([1, 1 / 2, 1 / 2, 0])
    assert s["f1"] == pytest.approx([4 / 5, 1 / 2, 4 / 7, 0])
    assert s["macro_precision"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)  # class 3 unused
    assert s["macro_recall"] == pytest.approx(2 / 3)
    assert s["macro_f1"] == pytest.approx((4 / 5 + 1 / 2 + 4 / 7) / 3)


def test_never_predicted_class_has_zero_precision():
    s = metrics.precision_recall_f1([[3, 1], [2, 0]])
    assert s["precision"] == pytest.approx([0.6, 0.0]) and s["f1"][1] == 0.0


def test_udine_table_is_reproduced():
    cm = udine_matrix()
    rows = metrics.per_class_table(cm, list(UDINE))
    for row, (name, (correct, wrong, acc)) in zip(rows, UDINE.items()):
        assert (row["class"], row["true_preds"], row["false_preds"]) == (name, correct, wrong)
        assert row["accuracy"] == pytest.approx(acc, abs=1e-5)
        assert row["recall"] == pytest.approx(acc, abs=1e-5)
    assert metrics.accuracy(cm) == pytest.approx(0.60914, abs=1e-5)
    assert metrics.mean_per_class_accuracy(cm) == pytest.approx(0.57944, abs=1e-5)

    table = metrics.format_table(rows).splitlines()
    assert table[0].split() == ["class", "true_preds", "false_preds", "accuracy", "precision", "recall", "f1"]
    assert "0.481830" in table[1] and "0.818991" in table[4]
    assert len({len(line) for line in table}) == 1  # every line ends on the same column


def test_summarize_is_json_ready():
    s = metrics.summarize(CM, ["a", "b", "c", "d"])
    back = json.loads(json.dumps(s, allow_nan=False))
    assert back["accuracy"] == pytest.approx(5 / 8)
    assert back["confusion_matrix"] == CM and back["classes"] == ["a", "b", "c", "d"]
    assert back["per_class"][3]["accuracy"] is None and back["per_class"][0]["f1"] == 0.8
    assert back["macro_recall"] == pytest.approx(back["mean_per_class_accuracy"])


def check_png(path, size=None):
    image = Image.open(path)
    assert image.format == "PNG"
    if size:
        assert image.size == size
    assert np.asarray(image.convert("L"), dtype=float).var() > 100  # not blank
    assert [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".png")] == [
        os.path.basename(path)
    ]  # no temporary file left behind
    return image


HISTORY = [
    {
        "epoch": e,
        "train_loss": 1.8 / e**0.5,
        "train_acc": 0.3 + 0.04 * e,
        "val_loss": 1.9 / e**0.3,
        "val_acc": 0.28 + 0.03 * e,
    }
    for e in range(1, 13)
]


@pytest.mark.parametrize(
    "history",
    [
        HISTORY,
        HISTORY[:1],
        [{k: v for k, v in row.items() if not k.startswith("val")} for row in HISTORY],
        [dict(row, val_loss=None if row["epoch"] == 3 else row["val_loss"], train_acc=math.nan) for row in HISTORY[:5]],
    ],
    ids=["full", "one-epoch", "no-val", "gaps"],
)
def test_plot_curves(tmp_path, history):
    path = str(tmp_path / "curves.png")
    assert metrics.plot_curves(history, path) == path
    image = check_png(path, (900, 400))
    has_val = any(row.get("val_loss") is not None for row in history)
    orange = (np.asarray(image.convert("RGB")) == metrics.VAL_COLOUR).all(-1).sum()
    assert (orange > 0) == has_val


def test_plot_confusion(tmp_path):
    path = str(tmp_path / "cm.png")
    assert metrics.plot_confusion(udine_matrix(), list(UDINE), path) == path
    image = check_png(path)
    assert image.width > 7 * 64 and image.height > 7 * 64
    metrics.plot_confusion(udine_matrix(), list(UDINE), path, normalize=False)  # overwrites
    check_png(path)
    (tmp_path / "plain.txt").write_text("")  # a plot gets the permissions any new file of the run gets
    assert os.stat(path).st_mode & 0o777 == os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "plain.txt"]  # no temporary file left


def test_error_summary_by_hand():
    summary = metrics.error_summary([10.0, 20.0, 36.0], [12, 20, 30], groups=[0, 1, 1], group_names=("kids", "adults"))
    assert (
        summary["mae"] == pytest.approx(8 / 3)
        and summary["median_error"] == 2
        and summary["within_5"] == pytest.approx(2 / 3)
    )
    assert summary["mae_by_group"] == {"kids": 2.0, "adults": 3.0}


def test_plot_error_histogram_and_bars(tmp_path):
    assert metrics.plot_error_histogram(torch.tensor([0.2, -1.4, 3.0, 40.0]), tmp_path / "e.png") == tmp_path / "e.png"
    assert Image.open(tmp_path / "e.png").size == (700, 360)
    metrics.plot_bars(
        [f"attribute {i}" for i in range(40)], [i / 40 for i in range(40)], tmp_path / "b.png", "accuracy"
    )
    assert Image.open(tmp_path / "b.png").height == 40 + 18 * 40 + 10


def test_an_epoch_axis_has_numbers_however_short_the_run():
    # a GAN stopped by --time-budget inside its first epoch traces at epochs 0.05 ... 0.6: its axis had no label
    assert metrics._epoch_ticks(0.05, 0.6) == pytest.approx([0.2, 0.4, 0.6])
    assert metrics._epoch_ticks(1, 30) == [10, 20, 30]
    assert metrics._epoch_ticks(1, 3) == [1, 2, 3]  # never 1.5
