"""README.md holds the exact test command that CI runs, and the default training command."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in command
    assert command in (REPO / "README.md").read_text()


def test_readme_shows_the_default_training_command():
    assert ".venv/bin/python train.py\n" in (REPO / "README.md").read_text()
