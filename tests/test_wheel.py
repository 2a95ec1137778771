"""vit as an installed wheel: the configs ship inside it, and its commands run from any folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_the_wheel():
    """pyproject.toml lists the packages by hand (conf/ is mapped to vit.conf, which automatic
    discovery cannot do), so a new subpackage must be added there or the wheel lacks it."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "vit").rglob("__init__.py")}
    assert on_disk | {"vit.conf"} == listed


def _fresh_python(tmp_path: Path) -> tuple[Path, Path]:
    """A new virtual environment (python, site-packages) that sees the main environment's
    installed dependencies but not its editable install of vit: a .pth line adds a folder to
    sys.path without running the .pth hooks inside it (the editable install is such a hook)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "main_environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python, site


@pytest.mark.slow
def test_wheel_installs_and_converts_to_shards_from_another_folder(tmp_path):
    # Build from a copy: building in place would leave build/ and vit.egg-info/ in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("vit", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True)
    wheel, = (tmp_path / "dist").glob("vit-*.whl")

    python, site = _fresh_python(tmp_path)
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--quiet", "--target", str(site), str(wheel)],
                   check=True)
    assert (site / "vit" / "conf" / "data" / "mnist5k.yaml").is_file()

    elsewhere = tmp_path / "elsewhere"  # not the checkout: `python -m` puts the current folder on sys.path
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import vit; from vit.conf_dir import conf_dir; "
                            "print(vit.__file__); print(conf_dir())"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.split()
    print("vit imported from", where[0])
    assert Path(where[0]) == site / "vit" / "__init__.py" and Path(where[1]) == site / "vit" / "conf"

    out = tmp_path / "shards"
    done = subprocess.run([str(python), "-m", "vit.data.shards", "data=mnist5k", f"data.root={REPO / 'data'}",
                           f"out={out}"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote mnist5k" in done.stdout and (out / "meta.json").is_file()
    assert all(list((out / split).glob("chunk-*.bin")) for split in ("train", "val", "test"))

    refused = subprocess.run([str(python), "-m", "vit.data.shards", "data=nope", f"out={tmp_path / 'x'}"],
                             cwd=elsewhere, env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and "available: cifar10" in refused.stderr
