"""Shared fixtures. Real datasets come from the folder named by VIT_TEST_DATA,
by default the workplace's shared copy beside the repository (../shared/datasets)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_datasets_dir() -> Path:
    return Path(os.environ.get("VIT_TEST_DATA", REPO.parent / "shared" / "datasets")).resolve()


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    root = shared_datasets_dir()
    if not (root / "MNIST" / "raw").is_dir():
        raise FileNotFoundError(
            f"real test datasets not found at {root}; set VIT_TEST_DATA to a folder with MNIST/raw, "
            f"FashionMNIST/raw, cifar10_jpeg_subset.npz and hymenoptera_data/")
    return root


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
