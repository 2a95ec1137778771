"""``build_datamodule``: the datamodule for a data config, chosen by ``data.name``.

The factory sits above every kind of datamodule so that none of them has to know the others:
``vit.data.datamodules`` (in memory, image folders) and ``vit.data.streaming`` (shards).
"""
from __future__ import annotations

from typing import Any, Mapping

from vit.data.config import DataConfig, resolve_config
from vit.data.datamodules import ArrayDataModule, ImageFolderDataModule, VisionDataModule


def build_datamodule(cfg: DataConfig | Mapping[str, Any] | None = None, **overrides: Any) -> VisionDataModule:
    """The datamodule for ``cfg`` (a DataConfig, a dict or an OmegaConf DictConfig of its fields).

    ``overrides`` replace single fields: ``build_datamodule(name="mnist", root="data")``.
    Raises ValueError for an unknown dataset name or an invalid option.
    """
    resolved = resolve_config(cfg, **overrides)
    if resolved.name == "shards":
        from vit.data.streaming import ShardDataModule  # imports litdata: only when shards are asked for

        return ShardDataModule(resolved)
    if resolved.name == "imagefolder":
        return ImageFolderDataModule(resolved)
    return ArrayDataModule(resolved)
