"""Scores of a classifier, the pictures every report shows (drawn with Pillow alone), and scores of a GAN's faces.

    confusion_matrix          counts, rows = true class, columns = predicted class
    accuracy, per_class_accuracy, mean_per_class_accuracy, precision_recall_f1
    per_class_table, format_table   the Udine report's per-class table, for the console
    summarize                 everything above as a JSON-ready dict
    error_summary             mean absolute error of a regression (age in years), its spread and per group
    mean_by_group             the mean of values per group (an error, or right/wrong for an accuracy)
    plot_curves               loss and accuracy per epoch, train and validation
    plot_confusion            the confusion matrix as a heat map with counts and percentages
    plot_error_histogram      how many predictions are off by 0, 1, 2, ... (e.g. years of age)
    plot_bars                 one horizontal bar per name (e.g. the accuracy of each of forty attributes)
    plot_lines                named series against one x axis, in panels side by side (e.g. a GAN's losses)
    save_image_grid           images as one picture, in rows (e.g. a GAN's samples)

GAN quality, offline (no Inception weights to download: features from MTCNN's ONet, so NOT the FID of papers):
    face_features             ONet's 256-d penultimate layer for each image (facenet-pytorch, imported only here)
    face_rate                 share of images ONet calls a face
    frechet_distance, gaussian_frechet_distance   FID-like distance between Gaussians fitted to two feature sets
    precision_recall          improved precision and recall (Kynkäänniemi et al. 2019)
    density_coverage          density and coverage (Naeem et al. 2020)
    near_duplicate_rate       share of generated images with a copy among the others
    gan_quality               all of them from generated and real images at once: the headline scores first
                              (Fréchet distance, coverage, recall: they fail on mode collapse and on noise alike),
                              then the diagnostics (precision, density, face rate, near-duplicates)

The classifier scores take the confusion matrix, so they are computed once from predictions and the
matrix is all a run needs to store. The drawing needs Pillow >= 10.1 for sized fonts.
"""

import contextlib
import functools
import math
import os

import torch
from PIL import Image, ImageDraw, ImageFont


def confusion_matrix(pred, target, num_classes):
    """LongTensor [K, K] counting samples of true class i predicted as class j at [i, j].

    pred may be class indices or logits [N, K] (the arg-max is taken).
    """
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.ndim == 2:
        pred = pred.argmax(1)
    # Each (true, predicted) pair gets its own bin number, so one bincount counts them all.
    pairs = target.long().flatten().cpu() * num_classes + pred.long().flatten().cpu()
    return torch.bincount(pairs, minlength=num_classes**2).view(num_classes, num_classes)


def accuracy(cm):
    """Fraction of all samples on the diagonal (nan for an empty matrix)."""
    cm = torch.as_tensor(cm).double()
    return (cm.trace() / cm.sum()).item()


def per_class_accuracy(cm):
    """Recall of each class as a float64 tensor; nan for a class with no samples."""
    cm = torch.as_tensor(cm).double()
    return cm.diagonal() / cm.sum(1)


def mean_per_class_accuracy(cm):
    """Mean of per_class_accuracy over the classes that have samples."""
    return per_class_accuracy(cm).nanmean().item()


def _divide(a, b):
    """a / b with 0 where b is 0, the usual convention for precision of a never-predicted class."""
    return torch.where(b > 0, a / b.clamp_min(1e-300), torch.zeros_like(a))


def precision_recall_f1(cm):
    """Per-class lists and their macro averages (plain means); 0/0 counts as 0.

    The averages skip classes that are neither in the targets nor in the predictions, as
    scikit-learn does, so an unused class slot does not pull every average down.
    """
    cm = torch.as_tensor(cm).double()
    correct = cm.diagonal()
    precision = _divide(correct, cm.sum(0))
    recall = _divide(correct, cm.sum(1))
    f1 = _divide(2 * precision * recall, precision + recall)
    used = (cm.sum(0) + cm.sum(1)) > 0
    return {
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "macro_precision": precision[used].mean().item(),
        "macro_recall": recall[used].mean().item(),
        "macro_f1": f1[used].mean().item(),
    }


def per_class_table(cm, classes):
    """One dict per class: class, true_preds, false_preds, accuracy, precision, recall, f1.

    false_preds are the samples of that class predicted as something else (row sum minus the
    diagonal), as in the Udine report, so accuracy = true_preds / (true_preds + false_preds).
    """
    cm = torch.as_tensor(cm)
    scores = precision_recall_f1(cm)
    accuracies = per_class_accuracy(cm).tolist()
    return [
        {
            "class": name,
            "true_preds": int(cm[i, i]),
            "false_preds": int(cm[i].sum() - cm[i, i]),
            "accuracy": accuracies[i],
            "precision": scores["precision"][i],
            "recall": scores["recall"][i],
            "f1": scores["f1"][i],
        }
        for i, name in enumerate(classes)
    ]


def format_table(rows):
    """The rows as an aligned text table: text to the left, numbers to the right, 6 decimals."""

    def cell(v):
        return f"{v:.6f}" if isinstance(v, float) else str(v)

    header = list(rows[0])
    lines = [header] + [[cell(row[key]) for key in header] for row in rows]
    widths = [max(len(line[j]) for line in lines) for j in range(len(header))]
    numeric = [not isinstance(rows[0][key], str) for key in header]
    return "\n".join(
        "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(line, widths, numeric)).rstrip()
        for line in lines
    )


def summarize(cm, classes):
    """Every score of the matrix in a dict that json.dump writes as is (nan becomes None)."""

    def clean(v):
        return None if isinstance(v, float) and math.isnan(v) else v

    scores = precision_recall_f1(cm)
    return {
        "accuracy": clean(accuracy(cm)),
        "mean_per_class_accuracy": clean(mean_per_class_accuracy(cm)),
        "macro_precision": scores["macro_precision"],
        "macro_recall": scores["macro_recall"],
        "macro_f1": scores["macro_f1"],
        "per_class": [{k: clean(v) for k, v in row.items()} for row in per_class_table(cm, classes)],
        "classes": list(classes),
        "confusion_matrix": torch.as_tensor(cm).tolist(),
    }


def error_summary(predicted, target, groups=None, group_names=()):
    """Mean absolute error, its median, 90th percentile and the share within 5, and the MAE within each group.

    predicted and target are numbers (e.g. ages in years); groups, when given, the group index of each target.
    """
    errors = (torch.as_tensor(predicted, dtype=torch.float64) - torch.as_tensor(target, dtype=torch.float64)).abs()
    summary = {
        "mae": errors.mean().item(),
        "median_error": errors.median().item(),
        "p90_error": errors.quantile(0.9).item(),
        "within_5": (errors <= 5).double().mean().item(),
    }
    if groups is not None:
        summary["mae_by_group"] = mean_by_group(errors, groups, group_names)
    return summary


def mean_by_group(values, groups, group_names) -> dict:
    """{name: the mean of the values in that group (None for an empty one)}; groups: each value's group index.

    Of errors, the mean error per group; of right/wrong (1/0), the accuracy per group.
    """
    values, groups = torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(groups)
    return {
        name: values[groups == g].mean().item() if (groups == g).any() else None for g, name in enumerate(group_names)
    }


# ---------------------------------------------------------------- pictures

TRAIN_COLOUR, VAL_COLOUR = (31, 119, 180), (230, 110, 0)
INK, GRID, FAINT = (40, 40, 40), (225, 225, 225), (170, 170, 170)
BLUES = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]


def _blue(v):
    """Colour of a value in [0, 1] on a white-to-navy scale (stops of ColorBrewer's Blues)."""
    position = min(max(v, 0.0), 1.0) * (len(BLUES) - 1)
    i = min(int(position), len(BLUES) - 2)
    t = position - i
    return tuple(round(a + (b - a) * t) for a, b in zip(BLUES[i], BLUES[i + 1]))


def _save(image, path):
    """Write a PNG under a temporary name in the same folder, then rename: never half a file."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{name}.tmp")  # created like any new file, so readable as the run's other files
    try:
        image.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def _ticks(low, high, count=5):
    """Round numbers (1, 2 or 5 times a power of ten) covering [low, high]."""
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    return [i * step for i in range(first, math.floor(high / step + 1e-9) + 1)]


def _epoch_ticks(low, high):
    """Ticks of an epoch axis: whole epochs (no tick at 1.5), fractions only where it spans less than two (a run
    stopped by --time-budget inside its first epoch)."""
    return [x for x in _ticks(low, high) if high - low < 2 or abs(x - round(x)) < 1e-9]


def _axes(draw, box, xlim, ylim, title, font):
    """Frame, grid and tick labels in box = (left, top, right, bottom); returns data -> pixel."""
    left, top, right, bottom = box

    def to_pixel(x, y):
        return (
            left + (x - xlim[0]) / (xlim[1] - xlim[0]) * (right - left),
            bottom - (y - ylim[0]) / (ylim[1] - ylim[0]) * (bottom - top),
        )

    for y in _ticks(*ylim):
        py = to_pixel(xlim[0], y)[1]
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.text((left - 6, py), f"{y:.4g}", fill=INK, font=font, anchor="rm")
    for x in _epoch_ticks(*xlim):
        px = to_pixel(x, ylim[0])[0]
        draw.line([(px, bottom), (px, bottom + 4)], fill=INK)
        draw.text((px, bottom + 7), f"{x:.4g}", fill=INK, font=font, anchor="mt")
    draw.rectangle(box, outline=INK)
    draw.text((left, top - 8), title, fill=INK, font=font, anchor="ls")
    return to_pixel


def plot_curves(history, path, size=(900, 400)):
    """Loss and accuracy per epoch side by side, train and (when present) val; returns path.

    history: list of dicts with epoch, train_loss, train_acc and optionally val_loss, val_acc;
    None and nan values leave a gap in the line.
    """
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    epochs = [row["epoch"] for row in history]
    # One epoch still gets an axis: one unit either side of it.
    xlim = (min(epochs), max(epochs)) if len(set(epochs)) > 1 else (epochs[0] - 1, epochs[0] + 1)
    half = size[0] // 2
    for panel, metric in enumerate(["loss", "acc"]):
        series = []
        for split, colour in [("train", TRAIN_COLOUR), ("val", VAL_COLOUR)]:
            points = [(e, row.get(f"{split}_{metric}")) for e, row in zip(epochs, history)]
            points = [(e, float(v) if v is not None and math.isfinite(v) else None) for e, v in points]
            if any(v is not None for _, v in points):
                series.append((split, colour, points))
        values = [v for _, _, points in series for _, v in points if v is not None] or [0.0, 1.0]
        low, high = min(values), max(values)
        pad = (high - low) * 0.08 or max(abs(high) * 0.1, 0.05)
        box = (panel * half + 70, 40, panel * half + half - 20, size[1] - 45)
        to_pixel = _axes(draw, box, xlim, (low - pad, high + pad), "loss" if metric == "loss" else "accuracy", font)
        draw.text(((box[0] + box[2]) / 2, size[1] - 10), "epoch", fill=INK, font=font, anchor="ms")
        legend_x = box[2]
        for split, colour, points in reversed(series):
            legend_x -= draw.textlength(split, font=font) + 30
            draw.line([(legend_x, box[1] - 13), (legend_x + 18, box[1] - 13)], fill=colour, width=3)
            draw.text((legend_x + 22, box[1] - 8), split, fill=INK, font=font, anchor="ls")
            # A missing value (None) ends one line and starts the next; with few epochs every
            # point also gets a dot, so a lone value between two gaps still shows.
            run = []
            for e, v in points + [(None, None)]:
                if v is not None:
                    run.append(to_pixel(e, v))
                    continue
                if len(run) > 1:
                    draw.line(run, fill=colour, width=2, joint="curve")
                for px, py in run if len(points) <= 30 or len(run) == 1 else []:
                    draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
                run = []
    return _save(image, path)


def plot_confusion(cm, classes, path, normalize=True):
    """Heat map of the matrix with count and row percentage in each cell; returns path.

    Cells are coloured by the row-normalised value (the share of that true class), so rare
    classes such as disgust are as readable as common ones; normalize=False colours by raw count.
    """
    cm = torch.as_tensor(cm).double()
    shares = _divide(cm, cm.sum(1, keepdim=True).expand_as(cm))
    shade = shares if normalize else cm / cm.max().clamp_min(1)
    font, bold = ImageFont.load_default(size=13), ImageFont.load_default(size=15)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(measure.textlength(str(name), font=font) for name in classes)
    cell = max(64, int(label_width) + 12)
    k = len(classes)
    left, top = int(label_width) + 40, 60
    title = f"accuracy {100 * accuracy(cm):.2f}%   mean per-class {100 * mean_per_class_accuracy(cm):.2f}%"
    width = max(left + k * cell + 20, int(measure.textlength(title, font=bold)) + 40)
    left += (width - (left + k * cell + 20)) // 2  # centre the grid under a wider title
    image = Image.new("RGB", (width, top + k * cell + 60), "white")
    draw = ImageDraw.Draw(image)
    draw.text((image.width / 2, 22), title, fill=INK, font=bold, anchor="mm")
    draw.text((left - 8, top - 8), "true", fill=INK, font=font, anchor="rs")
    for i in range(k):
        for j in range(k):
            v, count = float(shade[i, j]), int(cm[i, j])
            x0, y0 = left + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell, y0 + cell], fill=_blue(v), outline="white")
            if count == 0:  # a faint 0 keeps the eye on the cells that matter
                draw.text((x0 + cell / 2, y0 + cell / 2), "0", fill=FAINT, font=font, anchor="mm")
                continue
            ink = "white" if v > 0.55 else INK  # dark text would vanish on dark blue
            draw.text((x0 + cell / 2, y0 + cell / 2 - 8), str(count), fill=ink, font=bold, anchor="mm")
            draw.text(
                (x0 + cell / 2, y0 + cell / 2 + 10), f"{100 * shares[i, j]:.1f}%", fill=ink, font=font, anchor="mm"
            )
        draw.text((left - 8, top + i * cell + cell / 2), str(classes[i]), fill=INK, font=font, anchor="rm")
        draw.text((left + i * cell + cell / 2, top + k * cell + 8), str(classes[i]), fill=INK, font=font, anchor="mt")
    draw.text((left + k * cell / 2, image.height - 12), "predicted", fill=INK, font=font, anchor="ms")
    return _save(image, path)


def plot_error_histogram(errors, path, unit="years", size=(700, 360)):
    """Bars counting the absolute errors rounded to whole units (the last bar: that many or more); returns path."""
    raw = torch.as_tensor(errors, dtype=torch.float64).abs()
    errors = raw.round().long()
    top = min(int(errors.max()) if len(errors) else 0, 30)
    counts = torch.bincount(errors.clamp(max=top), minlength=top + 1).tolist()
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    box = (70, 40, size[0] - 20, size[1] - 45)
    to_pixel = _axes(
        draw,
        box,
        (-0.5, top + 0.5),
        (0, max(counts) * 1.08 or 1),
        f"absolute error ({len(raw)} predictions, mean {raw.mean():.2f})",
        font,
    )
    for value, count in enumerate(counts):
        (x0, y0), (x1, y1) = to_pixel(value - 0.4, count), to_pixel(value + 0.4, 0)
        draw.rectangle([x0, y0, x1, y1], fill=TRAIN_COLOUR)
    draw.text(
        ((box[0] + box[2]) / 2, size[1] - 10),
        f"{unit} off (the last bar: {top} or more)",
        fill=INK,
        font=font,
        anchor="ms",
    )
    return _save(image, path)


def plot_bars(names, values, path, title, row=18, width=800):
    """One horizontal bar per name, values in [0, 1] shown as percentages, in the order given; returns path."""
    font = ImageFont.load_default(size=13)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max(measure.textlength(str(name), font=font) for name in names)) + 16
    image = Image.new("RGB", (width, 40 + row * len(names) + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 20), title, fill=INK, font=font, anchor="lm")
    span = width - left - 70
    for i, (name, value) in enumerate(zip(names, values)):
        y = 40 + i * row
        draw.text((left - 8, y + row / 2), str(name), fill=INK, font=font, anchor="rm")
        draw.rectangle([left, y + 2, left + max(1.0, span * min(max(value, 0.0), 1.0)), y + row - 2], fill=TRAIN_COLOUR)
        draw.text(
            (left + span * min(max(value, 0.0), 1.0) + 6, y + row / 2),
            f"{100 * value:.1f}%",
            fill=INK,
            font=font,
            anchor="lm",
        )
    return _save(image, path)


SERIES_COLOURS = (TRAIN_COLOUR, VAL_COLOUR, (44, 160, 44), (214, 39, 40), (148, 103, 189))


def plot_lines(panels, path, xlabel="epoch", panel_size=(450, 400)):
    """Panels side by side, each a dict {series name: [(x, y), ...]} under its title; returns path.

    panels: list of (title, series). Non-finite values are left out; with 30 points or fewer each also gets a dot.
    """
    image = Image.new("RGB", (panel_size[0] * len(panels), panel_size[1]), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    for panel, (title, series) in enumerate(panels):
        kept = {
            name: [(float(x), float(y)) for x, y in points if y is not None and math.isfinite(y)]
            for name, points in series.items()
        }
        xs = [x for points in kept.values() for x, _ in points] or [0.0, 1.0]
        ys = [y for points in kept.values() for _, y in points] or [0.0, 1.0]
        xlim = (min(xs), max(xs)) if max(xs) > min(xs) else (min(xs) - 1, min(xs) + 1)
        pad = (max(ys) - min(ys)) * 0.08 or max(abs(max(ys)) * 0.1, 0.05)
        left = panel * panel_size[0]
        box = (left + 70, 40, left + panel_size[0] - 20, panel_size[1] - 45)
        to_pixel = _axes(draw, box, xlim, (min(ys) - pad, max(ys) + pad), title, font)
        draw.text(((box[0] + box[2]) / 2, panel_size[1] - 10), xlabel, fill=INK, font=font, anchor="ms")
        legend_x = box[2]
        for (name, points), colour in reversed(list(zip(kept.items(), SERIES_COLOURS))):
            legend_x -= draw.textlength(name, font=font) + 30
            draw.line([(legend_x, box[1] - 13), (legend_x + 18, box[1] - 13)], fill=colour, width=3)
            draw.text((legend_x + 22, box[1] - 8), name, fill=INK, font=font, anchor="ls")
            pixels = [to_pixel(x, y) for x, y in points]
            if len(pixels) > 1:
                draw.line(pixels, fill=colour, width=2, joint="curve")
            for px, py in pixels if len(pixels) <= 30 else []:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    return _save(image, path)


def save_image_grid(images, path, columns=8, padding=2):
    """uint8 images [N, C, H, W] (C = 1 or 3) as one PNG, `columns` to a row, white between them; returns path."""
    images = torch.as_tensor(images)
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.dtype != torch.uint8 or not len(images):
        raise ValueError(f"images must be uint8 [N, 1 or 3, H, W] with N > 0, not {images.dtype} {list(images.shape)}")
    count, _, height, width = images.shape
    columns = min(columns, count)
    rows = -(-count // columns)
    grid = torch.full(
        (3, padding + rows * (height + padding), padding + columns * (width + padding)), 255, dtype=torch.uint8
    )
    for i, picture in enumerate(images.expand(-1, 3, -1, -1).cpu()):
        top, left = padding + (i // columns) * (height + padding), padding + (i % columns) * (width + padding)
        grid[:, top : top + height, left : left + width] = picture
    return _save(Image.fromarray(grid.permute(1, 2, 0).numpy()), path)


# ---------------------------------------------------------------- GAN quality
#
# Computed offline: the Inception network behind the FID of papers cannot be downloaded here, so the features
# come from MTCNN's ONet, whose weights ship inside the facenet-pytorch package. Its numbers are NOT comparable
# with any published FID; they compare generators (and real data) with each other, at equal sample sizes.

# MTCNN's own square face box on CelebA crops (full detector, 200 images): median side 53 of 80 px, centred.
FACE_CROP = 0.66
FACE_THRESHOLD = 0.9
NEAR_DUPLICATE_QUANTILE = 0.01  # of the real nearest-neighbour distances: a real set scores about this much
MIN_QUALITY_IMAGES = 6  # density's k = 5 nearest real neighbours need 6 real images


@functools.lru_cache(maxsize=None)
def _onet(device: str):
    # Imported here: only the face features need facenet-pytorch, and some machines (the GPU one) lack it.
    try:
        from facenet_pytorch import ONet
    except ImportError:
        raise ImportError(
            "face features need facenet-pytorch (MTCNN's ONet weights ship inside it): pip install facenet-pytorch"
        ) from None
    return ONet(pretrained=True).to(device).eval()  # reads the package's onet.pt: nothing to download


def _onet_view(images, crop):
    """images as ONet sees a face: the centre square of side crop * min(H, W), 48x48, scaled as MTCNN scales.

    uint8 images are 0-255, float ones 0-1; one channel is repeated to three.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 3, H, W] (or [N, 1, H, W]), not {list(images.shape)}")
    pixels = images.float() if images.dtype == torch.uint8 else images.float() * 255
    pixels = pixels.expand(-1, 3, -1, -1)
    height, width = pixels.shape[-2:]
    side = max(1, round(min(height, width) * crop))
    top, left = (height - side) // 2, (width - side) // 2
    pixels = pixels[..., top : top + side, left : left + side]
    pixels = torch.nn.functional.interpolate(
        pixels, size=(48, 48), mode="bilinear", antialias=True, align_corners=False
    )
    return (pixels - 127.5) * 0.0078125


def _checked_images(images):
    """images as a tensor, refused in one line when their values cannot be pixels."""
    images = torch.as_tensor(images)
    if len(images) == 0:
        raise ValueError("no images: ONet features need at least one image")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"images are {images.dtype}: pass uint8 pixels (0-255) or floats in [0, 1]")
    if not images.isfinite().all():
        raise ValueError("images hold NaN or infinite values: pass finite pixels (uint8 0-255 or floats in [0, 1])")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise ValueError(
            f"float images must be in [0, 1], these span {low:g} to {high:g}: pass uint8 for 0-255 "
            "pixels, or rescale (x / 255, or (x + 1) / 2 for [-1, 1])"
        )
    return images


def _onet_outputs(images, device, batch_size, crop):
    """ONet's 256-d penultimate features [N, 256] and face probability [N] of each image, from one pass, on the CPU."""
    images = _checked_images(images)
    onet = _onet(str(device))
    features, face_probability = [], []
    # The hook takes prelu5's output inside ONet's own forward, so the flatten before dense5 (permuted to the
    # order of the original Caffe weights) is exactly ONet's.
    hook = onet.prelu5.register_forward_hook(lambda module, inputs, output: features.append(output.float().cpu()))
    try:
        with torch.no_grad():
            for batch in images.split(batch_size):
                _, _, probability = onet(_onet_view(batch.to(device), crop))
                face_probability.append(probability[:, 1].float().cpu())  # column 1 of the softmax: face
    finally:
        hook.remove()
    return torch.cat(features), torch.cat(face_probability)


def face_features(images, device="cpu", batch_size=256, crop=FACE_CROP):
    """Float32 [N, 256]: MTCNN ONet's penultimate layer (dense5 + PReLU) for each image, on the CPU.

    images: uint8 [N, 3, H, W] (0-255) or float in [0, 1]. ONet sees the centre square of side crop (a share of
    the side; 1.0 is the whole image) resized to 48x48 (bilinear, antialiased) and scaled as MTCNN does. The
    default crop frames a CelebA-style face as MTCNN's own box does, the framing ONet was trained on; for images
    cropped as tightly as MTCNN crops, pass crop=1.0. These are the features of frechet_distance and the
    neighbour metrics here: not Inception's, so not the FID of papers.
    """
    return _onet_outputs(images, device, batch_size, crop)[0]


def face_rate(images, device="cpu", threshold=FACE_THRESHOLD, batch_size=256, crop=FACE_CROP):
    """Share of images that MTCNN's last stage (ONet) calls a face with probability >= threshold.

    A generated CelebA-style face is already a face crop, so the centre square (see face_features) is handed to
    ONet as MTCNN hands it a candidate box, skipping the two stages that search a photo for boxes: about 35
    times faster than the full detector. On real CelebA crops the rate is about 0.99 (the whole 80x80 crop,
    crop=1.0: 0.09), on noise 0; ONet is lenient (it passes about a third of upside-down faces), so this
    catches images that are no face at all, not bad faces.
    """
    return (_onet_outputs(images, device, batch_size, crop)[1] >= threshold).double().mean().item()


def _points(features, name="features"):
    """features as a float64 [N, D] tensor, the precision every distance here is computed in."""
    points = torch.as_tensor(features).double()
    if points.ndim != 2:
        raise ValueError(f"{name} must be [N, D], not {list(points.shape)}: pass one feature vector per row")
    if not points.isfinite().all():
        raise ValueError(f"{name} hold NaN or infinite values: pass the features of finite images")
    return points


def _two_sets(a, b, names=("real", "fake")):
    """Two feature sets as float64 [N, D] and [M, D], refused in one line when their widths differ."""
    a, b = _points(a, f"{names[0]} features"), _points(b, f"{names[1]} features")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} features are {list(a.shape)} and {names[1]} ones {list(b.shape)}: pass both "
            "from the same network (as many values per image)"
        )
    return a, b


@contextlib.contextmanager
def _one_thread():
    """Torch on one CPU thread inside the block, as many as before after it."""
    # MKL's threaded eigensolver synchronises its threads at every step: on a machine with more work than
    # cores, a 256 x 256 decomposition took 2 s instead of the 5 ms it takes on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gaussian_frechet_distance(mu_a, cov_a, mu_b, cov_b):
    """Fréchet distance between N(mu_a, cov_a) and N(mu_b, cov_b):

    ||mu_a - mu_b||^2 + tr(cov_a) + tr(cov_b) - 2 tr sqrtm(cov_a cov_b), in float64, without scipy.
    sqrt(cov_a) cov_b sqrt(cov_a) is symmetric, positive semi-definite and similar to cov_a cov_b, so the square
    roots of its eigenvalues sum to tr sqrtm(cov_a cov_b); eigh on symmetric matrices never turns complex as
    scipy's sqrtm of the product can. Eigenvalues below 0 by rounding count as 0, and so does such a distance.
    """
    mu_a, cov_a, mu_b, cov_b = (torch.as_tensor(v).double() for v in (mu_a, cov_a, mu_b, cov_b))
    if not all(v.isfinite().all() for v in (mu_a, cov_a, mu_b, cov_b)):
        raise ValueError(
            "the means and covariances hold NaN or infinite values: fit each to 2 or more finite feature vectors"
        )
    with _one_thread():
        values, vectors = torch.linalg.eigh(cov_a)
        sqrt_a = (vectors * values.clamp_min(0).sqrt()) @ vectors.T
        middle = sqrt_a @ cov_b @ sqrt_a
        trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)


def frechet_distance(features_a, features_b):
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (mean, unbiased covariance).

    With face_features this is an FID-like score in ONet's space, not the Inception FID of papers. It falls as
    the sets grow even for identical distributions, so compare numbers only at equal set sizes. Copies of one
    vector are a legitimate set (covariance 0); a single vector has no covariance and is refused.
    """
    a, b = _two_sets(features_a, features_b, ("first", "second"))
    if min(len(a), len(b)) < 2:
        raise ValueError(
            f"a Fréchet distance needs 2 or more feature vectors in each set, got {len(a)} and {len(b)}: "
            "pass more images"
        )
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def _distances(points, others):
    """Euclidean distances [len(points), len(others)]; those within rounding of 0 are 0.

    cdist takes |a|^2 + |b|^2 - 2 a.b from a matrix product (6x faster than summing differences at 5,000 x 5,000 x
    256), whose rounding leaves copies of one vector ~1e-7 apart (measured: 7e-7 at |a|^2 = |b|^2 = 2,300, a squared
    distance of 1e-16 (|a|^2 + |b|^2)) rather than 0. Copies must be 0 apart for radius-0 balls to hold them, so squared
    distances below 1e-12 (|a|^2 + |b|^2), 10,000 times that rounding, count as 0. The rest still rounds
    differently by block size and CPU, in the last few bits.
    """
    distances = torch.cdist(points, others)
    scale = points.square().sum(1)[:, None] + others.square().sum(1)
    return distances.masked_fill_(distances.square() <= 1e-12 * scale, 0)


def _kth_nearest(points, others=None, k=1, rows=1024):
    """Distance from each point to its k-th nearest among others; others=None: among points, skipping itself.

    rows points at a time, so 5,000 x 5,000 distances need 40 MB, not 200.
    """
    same_set = others is None
    others = points if same_set else others
    if k > len(others) - same_set:
        raise ValueError(
            f"k = {k} nearest neighbours need {k + same_set} or more feature vectors, got {len(others)}: "
            "pass more images"
        )
    found = []
    for start in range(0, len(points), rows):
        distances = _distances(points[start : start + rows], others)
        if same_set:
            index = torch.arange(len(distances))
            distances[index, index + start] = math.inf
        found.append(distances.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(found)


def _balls_holding(points, centres, radii, rows=1024):
    """For each point, how many balls (centres[i], radii[i]) hold it.

    The boundary counts, as in Kynkäänniemi et al.'s definition; the prdc code of Naeem et al. uses <, which
    differs only on ties (exact copies).
    """
    return torch.cat([(_distances(part, centres) <= radii).sum(1) for part in points.split(rows)])


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkäänniemi et al. 2019) of fake features [M, D] against real [N, D].

    Each real point gets a ball reaching its k-th nearest other real point; precision is the share of fake
    points inside at least one real ball (fakes look real). Recall is the same with the roles swapped (the
    real data is covered by what the generator makes). Both in [0, 1]; the paper's k is 3.

    Precision does not fail on mode collapse (copies of one real-looking face are all precise), and a real outlier's
    huge ball can hold every fake. Copies of one vector have balls of radius 0 that hold only that vector.
    """
    real, fake = _two_sets(real, fake)
    precision = (_balls_holding(fake, real, _kth_nearest(real, k=k)) > 0).double().mean().item()
    recall = (_balls_holding(real, fake, _kth_nearest(fake, k=k)) > 0).double().mean().item()
    return {"precision": precision, "recall": recall}


def density_coverage(real, fake, k=5):
    """Density and coverage (Naeem et al. 2020) of fake features [M, D] against real [N, D].

    Balls around the real points only (a generator's outliers would inflate balls of its own), each reaching
    its centre's k-th nearest other real point. Density = (1 / kM) * sum over fakes of the number of real balls holding
    it: about 1 when fakes are spread like the real data, above 1 where they crowd dense regions. Coverage =
    the share of real balls holding at least one fake. The paper's k is 5. Coverage fails on mode collapse and on
    noise alike; density, like precision, does not fail on collapse onto a real-looking face.
    """
    real, fake = _two_sets(real, fake)
    radii = _kth_nearest(real, k=k)
    density = _balls_holding(fake, real, radii).double().sum().item() / (k * len(fake))
    coverage = (_kth_nearest(real, fake) <= radii).double().mean().item()
    return {"density": density, "coverage": coverage}


def near_duplicate_rate(fake, real):
    """Share of generated images whose nearest other generated image is closer than all but the closest 1% of real
    images are to theirs: the sign of mode collapse. It does not fail on noise (noise images are far apart).

    The bar is the 1st percentile (NEAR_DUPLICATE_QUANTILE) of the distances from each real feature vector to its
    nearest other distinct one (exact duplicates in the real set, which CelebA has, count once), so a second real
    set of the same size scores about 0.01 by construction. Exact copies among the fakes always count, even where
    the real set has no two distinct vectors to set a bar. Nearest-neighbour distances shrink as a set grows, so
    give sets of about equal size.

    The bar was once the smallest of those distances, an extreme that falls as the real set grows and with
    CelebA's near-identical crops. In ONet's features of 64x64 CelebA crops it fell from 0.31 at 500 real faces to
    0.11 at 5,000 (the 1st percentile: 0.34 to 0.29), and an untrained generator's near-identical images scored
    0.99 against 500 faces, 0.94 against 1,000 and 0 against 2,000 or 5,000; with the 1st percentile 0.99 to 1.00
    at every size, and a second real set 0.007 to 0.011.
    """
    real, fake = _two_sets(real, fake)
    if len(fake) < 2:
        raise ValueError(f"near-duplicates need 2 or more generated feature vectors, got {len(fake)}: pass more images")
    distinct = torch.unique(real, dim=0)
    bar = torch.quantile(_kth_nearest(distinct), NEAR_DUPLICATE_QUANTILE).item() if len(distinct) > 1 else 0.0
    nearest = _kth_nearest(fake)
    return ((nearest < bar) | (nearest == 0)).double().mean().item()


def gan_quality(fake_images, real_images, device="cpu", train_images=None, crop=FACE_CROP):
    """Every GAN score above from uint8 images [N, 3, H, W], each set through ONet once, as a JSON-ready dict.

    First the headline scores, which fail on both mode collapse and noise: frechet_distance (ONet space, not the
    Inception FID), coverage, recall. Then the diagnostics, each blind to one failure: precision and density (a
    generator collapsed onto one real-looking face scores well), face_rate of the fakes (blind to collapse onto a
    face) beside real_face_rate, near_duplicates (blind to noise). Then the set sizes fake_count and real_count (the
    Fréchet distance depends on them). real_images should be held out from training. With train_images (best as
    many as the fakes), real_vs_real_frechet is their distance to real_images: what a perfect generator would
    reach. Copies of one image are a legitimate set and score as collapsed; fewer than 6 images are refused.
    """
    counts = [len(images) for images in (fake_images, real_images)]
    if min(counts) < MIN_QUALITY_IMAGES:
        raise ValueError(
            f"GAN quality needs {MIN_QUALITY_IMAGES} or more generated and real images (density's 5 "
            f"nearest real neighbours), got {counts[0]} and {counts[1]}: pass more images"
        )
    fake, fake_faces = _onet_outputs(fake_images, device, 256, crop)
    real, real_faces = _onet_outputs(real_images, device, 256, crop)
    recall = precision_recall(real, fake)
    density = density_coverage(real, fake)
    quality = {
        "frechet_distance": frechet_distance(real, fake),
        "coverage": density["coverage"],
        "recall": recall["recall"],
        "precision": recall["precision"],
        "density": density["density"],
        "face_rate": (fake_faces >= FACE_THRESHOLD).double().mean().item(),
        "real_face_rate": (real_faces >= FACE_THRESHOLD).double().mean().item(),
        "near_duplicates": near_duplicate_rate(fake, real),
        "fake_count": len(fake),
        "real_count": len(real),
    }
    if train_images is not None:
        quality["real_vs_real_frechet"] = frechet_distance(face_features(train_images, device, crop=crop), real)
    return quality
