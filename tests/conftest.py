"""Shared fixtures. Real datasets come from the folder named by VIT_TEST_DATA, by default the
workplace's shared copy beside the repository (../shared/datasets); see tests/realdata.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from realdata import cache_dir, configured_dir, ensure_datasets, missing


def pytest_configure(config: pytest.Config) -> None:
    """Without the datasets at hand, run in one process instead of pytest-xdist's workers (addopts):
    two workers would both fetch them, and a worker cannot stop the run with one readable message."""
    if hasattr(config, "workerinput") or getattr(config.option, "dist", "no") == "no":
        return
    if missing(configured_dir()) and missing(cache_dir()):
        config.option.dist, config.option.numprocesses = "no", None


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share two cores: one thread each, and the same for the train.py processes they
    # start (which inherit the environment). Two threads each made tests several times slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Check for the datasets once, before any test runs, and only when a collected test needs them."""
    if not any("datasets_root" in getattr(item, "fixturenames", ()) for item in items):
        return
    try:
        root, note = ensure_datasets()
    except RuntimeError as error:
        pytest.exit(f"error: {error}", returncode=2)
    if note:
        print(f"\n{note}")
    os.environ["VIT_TEST_DATA"] = str(root)  # fixtures and the subprocesses that tests start read it


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    return configured_dir()


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
