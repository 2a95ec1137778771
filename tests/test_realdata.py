"""The tests' own data check: on a machine without the datasets and without a network, the suite
stops at once with one message that says what to provide, instead of failing test by test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import realdata

REPO = Path(__file__).resolve().parents[1]


def test_offline_without_datasets_stops_at_once_naming_vit_test_data(tmp_path):
    env = {**os.environ, "VIT_TEST_DATA": str(tmp_path / "empty"), "HOME": str(tmp_path),
           # a proxy nobody listens on: every download is refused at once, as offline
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_data.py", "-k", "mnist_sizes"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "VIT_TEST_DATA" in output and "MNIST/raw" in output and "hymenoptera_data" in output
    assert "Traceback" not in output and "no tests ran" in output


def test_tests_without_data_do_not_need_the_datasets(tmp_path):
    env = {**os.environ, "VIT_TEST_DATA": str(tmp_path / "empty"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_measure.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_missing_lists_what_a_folder_lacks(tmp_path):
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    np.savez(tmp_path / "cifar10_jpeg_subset.npz", x=np.zeros(1))
    assert realdata.missing(tmp_path) == ["FashionMNIST/raw", "hymenoptera_data/train"]
