"""compare.py: a report from two tiny real runs, every figure traceable to results.json."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from test_training import REPO, compose_train, quick
from vit.compare import COLUMNS, find_runs, write_report
from vit.training import run


def test_report_from_two_real_runs(tmp_path):
    sweep = tmp_path / "sweep"
    for model in ("linear_mnist", "cnn_mnist"):
        run(compose_train(*quick(sweep / model, f"model={model}", "trainer.max_epochs=2", "callbacks.test_curve=true")))
    runs = find_runs([sweep])
    assert sorted(r.results["model"] for r in runs) == ["cnn_mnist", "linear_mnist"]
    for record in runs:  # one test accuracy and one training time per epoch, from metrics.csv
        assert sorted(record.curves["curve/test_acc"]) == [0, 1]
        assert record.curves["curve/train_time_s"][1] >= record.curves["curve/train_time_s"][0] > 0

    done = subprocess.run([sys.executable, str(REPO / "compare.py"), str(sweep), "--out", str(tmp_path / "report")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = tmp_path / "report"
    for name in ("report.md", "report.html", "accuracy_vs_epoch.png", "accuracy_vs_time.png", "params_vs_accuracy.png"):
        assert (report / name).is_file(), name
    assert Image.open(report / "accuracy_vs_time.png").size[0] > 300

    markdown = (report / "report.md").read_text()
    header = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    assert header in markdown
    for record in runs:  # every cell is the run's own results.json value, formatted
        saved = json.loads((record.path / "results.json").read_text())
        cells = [fmt.format(saved[key]) if saved.get(key) is not None else "-" for key, _, fmt in COLUMNS]
        assert "| " + " | ".join(cells) + " |" in markdown
        assert saved["params"] in (7850, 421642) and cells[2] in ("7,850", "421,642")
    html = (report / "report.html").read_text()
    assert "<table>" in html and "7,850" in html and "accuracy_vs_epoch.png" in html


def test_compare_without_runs_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "compare.py"), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "no results.json" in done.stderr


def test_write_report_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="no runs to compare"):
        write_report([], tmp_path)
