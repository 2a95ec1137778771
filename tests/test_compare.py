"""compare.py: a report from two tiny real runs, every figure traceable to results.json."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from PIL import Image

from test_training import REPO, compose_train, quick
from vit.compare import COLUMNS, find_runs, table_headers, table_rows, time_to_accuracy, write_report
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
    for text in (markdown, html):  # runs are named, but not by this machine's absolute paths
        assert str(tmp_path) not in text and "linear_mnist" in text


def test_compare_without_runs_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "compare.py"), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "no results.json" in done.stderr


def test_write_report_needs_runs(tmp_path):
    with pytest.raises(ValueError, match="no runs to compare"):
        write_report([], tmp_path)


# An absolute path in a report: a '/' that starts a token and is followed by a name
# ('images/s' and '</td>' do not start a token).
ABSOLUTE_PATH = re.compile(r"(?:^|[\s`'\"(,=])/[\w.~-]")


def _fake_run(run_dir, model, params, test_acc):
    """A finished run as compare.py reads it: results.json and a two-epoch metrics.csv."""
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(
        {"model": model, "dataset": "mnist", "params": params, "epochs": 2, "test_acc": test_acc}))
    (run_dir / "metrics.csv").write_text(
        "epoch,step,val/acc,curve/test_acc,curve/train_time_s\n"
        f"0,10,0.5,0.5,1.0\n1,20,{test_acc},{test_acc},2.0\n")
    return run_dir


def test_a_report_carries_no_absolute_path(tmp_path):
    sweep = tmp_path / "sweep"
    _fake_run(sweep / "0_model=linear_mnist", "linear_mnist", 7850, 0.87)
    _fake_run(sweep / "1_model=cnn_mnist", "cnn_mnist", 421642, 0.99)
    out = tmp_path / "report"
    # a run inside the report's folder
    inside = _fake_run(out / "runs" / "2_model=vit_mnist", "vit_mnist", 205962, 0.99)
    written = write_report(find_runs([sweep, inside]), out)

    for key in ("markdown", "html"):
        text = written[key].read_text()
        assert str(tmp_path) not in text
        assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text)
        # runs outside the report's folder by their folder name, runs inside it relative to it
        assert "0_model=linear_mnist" in text and "1_model=cnn_mnist" in text
        assert "runs/2_model=vit_mnist" in text
    assert "`0_model=linear_mnist`" in written["markdown"].read_text()


def test_committed_reports_carry_no_absolute_path():
    reports = sorted((REPO / "docs").glob("*/report.*"))
    assert reports  # docs/compare_mnist and docs/compare_cifar2
    for report in reports:
        text = report.read_text()
        assert not ABSOLUTE_PATH.search(text), (report, ABSOLUTE_PATH.search(text))


def test_time_to_accuracy_is_the_first_epoch_at_or_above_each_threshold(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"model": "vit_mnist", "params": 1, "test_acc": 0.991}))
    (run_dir / "metrics.csv").write_text(
        "epoch,step,curve/test_acc,curve/train_time_s\n0,10,0.85,12.5\n1,20,0.951,25.0\n2,30,0.94,37.5\n"
        "3,40,0.991,50.0\n")
    [run] = find_runs([run_dir])
    assert [time_to_accuracy(run, t) for t in (0.8, 0.9, 0.95, 0.99, 0.995)] == [12.5, 25.0, 25.0, 50.0, None]
    assert table_headers()[-3:] == ["time to 0.9 (s)", "time to 0.95 (s)", "time to 0.99 (s)"]
    assert table_rows([run])[0][-3:] == ["25.0", "25.0", "50.0"]
    report = write_report([run], tmp_path / "report")["markdown"].read_text()
    assert "time to 0.99 (s)" in report and "| 50.0 |" in report
