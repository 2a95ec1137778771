"""What a run leaves for a person: loss and accuracy curves, the test confusion matrix,
and ``results.json``. Figures are drawn from the run's own ``metrics.csv``."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_epoch_metrics(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """``{column: {epoch: value}}`` from Lightning's CSVLogger file; per-epoch rows only
    (step-level columns such as ``train/loss_step`` are dropped)."""
    series: dict[str, dict[int, float]] = defaultdict(dict)
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for key, value in row.items():
                if key in ("epoch", "step") or key.endswith("_step") or value in ("", None):
                    continue
                series[key][epoch] = float(value)
    return dict(series)


def plot_curves(metrics_csv: Path, out_dir: Path) -> list[Path]:
    """``loss.png`` and ``accuracy.png``: train and validation per epoch (1-based)."""
    series = read_epoch_metrics(metrics_csv)
    written = []
    for quantity, keys, filename in (
        ("loss", ("train/loss_epoch", "val/loss"), "loss.png"),
        ("accuracy", ("train/acc", "val/acc"), "accuracy.png"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for key in keys:
            if key in series:
                epochs = sorted(series[key])
                ax.plot([e + 1 for e in epochs], [series[key][e] for e in epochs], marker="o",
                        label=key.split("/")[0].replace("val", "validation"))
        ax.set_xlabel("epoch")
        ax.set_ylabel(quantity)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{quantity} per epoch")
        fig.tight_layout()
        path = out_dir / filename
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """Rows: true class, columns: predicted; cells show counts, colour the row-normalised rate."""
    matrix = np.asarray(matrix)
    rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=120)
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= 20:
        for i in ticks:
            for j in ticks:
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"test confusion matrix (accuracy {accuracy:.4f})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plain(value: Any) -> Any:
    """JSON-ready: tensors and numpy scalars become numbers, NaN becomes null."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_results(path: Path, results: dict[str, Any]) -> Path:
    """``results`` as JSON, written all or nothing: a reader never sees half a file, and a full
    disk is one message naming the folder and the bytes needed (DiskFullError), the previous
    file left as it was."""
    # Imported here: vit.checkpoints brings Lightning, which compare.py, reading results, does not need.
    from vit.checkpoints import write_atomically

    data = (json.dumps(_plain(results), indent=2) + "\n").encode()
    write_atomically(path, lambda stream: stream.write(data), len(data))
    return path
