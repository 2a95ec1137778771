"""Shared fixtures. Real datasets come from the folder named by VIT_TEST_DATA, by default the
workplace's shared copy beside the repository (../shared/datasets); see tests/realdata.py."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from realdata import configured_dir, ensure_datasets


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
