"""Compare finished runs: a table and plots built only from each run's ``results.json`` and
``metrics.csv``, written as ``report.md`` and ``report.html`` beside the PNG figures.

Besides final accuracy the table gives *time to accuracy*: the training time at which a run's
test accuracy (``callbacks.test_curve=true``) first reached each threshold. A model that is
better in the end is not always the one to choose when compute is short.

``python compare.py RUN_DIR_OR_SWEEP_DIR... [--out DIR]``
"""
from __future__ import annotations

import html
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vit.reports import read_epoch_metrics  # noqa: E402

# (results.json key, column title, format)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("model", "model", "{}"),
    ("dataset", "dataset", "{}"),
    ("params", "parameters", "{:,}"),
    ("flops_per_image", "FLOPs / image", "{:,}"),
    ("train_images_per_s", "train images/s", "{:,.0f}"),
    ("inference_images_per_s", "inference images/s", "{:,.0f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:,.0f}"),
    ("epochs", "epochs", "{}"),
    ("train_time_s", "train time (s)", "{:,.1f}"),
    ("val_acc", "best val acc", "{:.4f}"),
    ("test_acc", "test acc", "{:.4f}"),
)
THRESHOLDS: tuple[float, ...] = (0.90, 0.95, 0.99)  # test accuracies whose time to reach is reported


@dataclass
class RunRecord:
    """One finished run: its directory, its results and its per-epoch curves."""

    path: Path
    results: dict[str, Any]
    curves: dict[str, dict[int, float]] = field(default_factory=dict)

    label: str = ""  # set by find_runs: the model name, plus the run folder where models repeat


def find_runs(paths: Sequence[str | Path]) -> list[RunRecord]:
    """Run directories as given, or every run below a sweep directory (those holding results.json)."""
    runs = []
    for given in map(Path, paths):
        found = [given] if (given / "results.json").is_file() else sorted(p.parent for p in given.rglob("results.json"))
        if not found:
            raise FileNotFoundError(f"no results.json in {given} or below it; pass run or sweep directories")
        for run_dir in found:
            results = json.loads((run_dir / "results.json").read_text())
            metrics = run_dir / "metrics.csv"
            runs.append(RunRecord(run_dir, results, read_epoch_metrics(metrics) if metrics.is_file() else {}))
    models = [run.results["model"] for run in runs]
    for run in runs:
        run.label = run.results["model"] if models.count(run.results["model"]) == 1 \
            else f"{run.results['model']} ({run.path.name})"
    return runs


def time_to_accuracy(run: RunRecord, threshold: float) -> float | None:
    """Training seconds at the end of the first epoch whose test accuracy reached ``threshold``;
    None when it never did, or when the run logged no test curve."""
    accuracy, seconds = run.curves.get("curve/test_acc", {}), run.curves.get("curve/train_time_s", {})
    return next((seconds[epoch] for epoch in sorted(accuracy)
                 if accuracy[epoch] >= threshold and epoch in seconds), None)


def table_headers(thresholds: Sequence[float] = THRESHOLDS) -> list[str]:
    return [title for _, title, _ in COLUMNS] + [f"time to {t:g} (s)" for t in thresholds]


def table_rows(runs: Sequence[RunRecord], thresholds: Sequence[float] = THRESHOLDS) -> list[list[str]]:
    """Formatted cells, one row per run, in :func:`table_headers` order; a missing figure shows as '-'."""
    rows = []
    for run in runs:
        row = []
        for key, _, fmt in COLUMNS:
            value = run.results.get(key)
            row.append("-" if value is None else fmt.format(value))
        for threshold in thresholds:
            seconds = time_to_accuracy(run, threshold)
            row.append("-" if seconds is None else f"{seconds:,.1f}")
        rows.append(row)
    return rows


def _plot_curves(runs: Sequence[RunRecord], x_key: str | None, xlabel: str, path: Path) -> Path | None:
    """Test accuracy per epoch (``x_key`` None) or against cumulative training time; runs made
    without ``callbacks.test_curve=true`` fall back to validation accuracy, said in the legend."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    # Many runs stay apart by colour and line style together; time spans decades, so log scale.
    colours = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    styles = ("-", "--", "-.", ":")
    drawn = False
    for i, run in enumerate(runs):
        y_key, what = ("curve/test_acc", "test") if "curve/test_acc" in run.curves else ("val/acc", "val")
        ys = run.curves.get(y_key, {})
        if x_key is None:
            points = [(epoch + 1, ys[epoch]) for epoch in sorted(ys)]
        else:
            xs = run.curves.get(x_key, {})
            points = [(xs[epoch], ys[epoch]) for epoch in sorted(ys) if epoch in xs]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=2.5, linewidth=1.3, color=colours[i % len(colours)],
                    linestyle=styles[(i // len(colours)) % len(styles)], label=f"{run.label} [{what}]")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if x_key is not None:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel + (" (log scale)" if x_key is not None else ""))
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_params_vs_accuracy(runs: Sequence[RunRecord], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for run in runs:
        if run.results.get("test_acc") is not None:
            ax.scatter(run.results["params"], run.results["test_acc"], s=40)
            ax.annotate(run.results["model"], (run.results["params"], run.results["test_acc"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _report_path(run_dir: Path, out_dir: Path) -> str:
    """How the report names a run: its path relative to the report's folder when the run lies
    inside that folder, otherwise the run's folder name alone. A report is often committed or
    shared, so it never carries the absolute paths of the machine that made it."""
    run_dir = run_dir.resolve()
    try:
        return run_dir.relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return run_dir.name


def write_report(runs: Sequence[RunRecord], out_dir: Path, extra_images: Sequence[Path] = ()) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the figures into ``out_dir``; returns their paths."""
    if not runs:
        raise ValueError("no runs to compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "accuracy_vs_epoch": _plot_curves(runs, None, "epoch", out_dir / "accuracy_vs_epoch.png"),
        "accuracy_vs_time": _plot_curves(runs, "curve/train_time_s", "training time (s)",
                                         out_dir / "accuracy_vs_time.png"),
        "params_vs_accuracy": _plot_params_vs_accuracy(runs, out_dir / "params_vs_accuracy.png"),
    }
    for image in extra_images:
        shutil.copy(image, out_dir / image.name)
    images = [p.name for p in figures.values() if p is not None] + [p.name for p in extra_images]
    headers = table_headers()
    rows = table_rows(runs)
    sources = [_report_path(run.path, out_dir) for run in runs]

    markdown = ["# Model comparison", "",
                "Every figure below is read from the runs' `results.json` and `metrics.csv`.", "",
                "| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    markdown += ["", "Runs: " + ", ".join(f"`{s}`" for s in sources), ""]
    markdown += [f"![{name}]({name})" for name in images]
    (out_dir / "report.md").write_text("\n".join(markdown) + "\n")

    cell = lambda tag, text: f"<{tag}>{html.escape(text)}</{tag}>"  # noqa: E731
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>Model comparison</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}img{max-width:720px;display:block;"
            "margin:1em 0}</style></head><body><h1>Model comparison</h1>",
            "<p>Every figure is read from the runs' results.json and metrics.csv.</p><table>",
            "<tr>" + "".join(cell("th", h) for h in headers) + "</tr>"]
    page += ["<tr>" + "".join(cell("td", c) for c in row) + "</tr>" for row in rows]
    page += ["</table><p>Runs: " + html.escape(", ".join(sources)) + "</p>"]
    page += [f"<img src='{html.escape(name)}' alt='{html.escape(name)}'>" for name in images]
    page += ["</body></html>"]
    (out_dir / "report.html").write_text("\n".join(page) + "\n")
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html",
            **{k: v for k, v in figures.items() if v is not None}}
