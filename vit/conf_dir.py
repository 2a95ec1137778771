"""Where Hydra's config folder is, whether vit runs from a checkout or from an installed wheel.

The repository keeps the configs in ``conf/`` at its root (``train.py`` names it relative to
itself); a wheel ships the same files inside the package as ``vit/conf`` (see pyproject.toml),
since an installed package has no repository around it.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

# A file every config folder of this project has: it tells a config folder from any folder.
MARKER = "train.yaml"


def conf_dir() -> Path:
    """The config folder: ``vit/conf`` of an installed wheel, else the checkout's ``conf/``.

    An editable install (``pip install -e .``) runs the checkout's files, so it finds ``conf/``.
    """
    packaged = resources.files("vit") / "conf"
    checkout = Path(__file__).resolve().parents[1] / "conf"
    for candidate in (packaged, checkout):
        if candidate.is_dir() and (candidate / MARKER).is_file():
            return Path(str(candidate))
    raise FileNotFoundError(f"vit's config folder is missing: looked for {MARKER} in {packaged} (an installed "
                            f"wheel) and in {checkout} (a repository checkout); reinstall vit")
