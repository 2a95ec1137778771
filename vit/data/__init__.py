"""Datasets for training and evaluating image classifiers, as Lightning datamodules.

>>> from vit.data import build_datamodule
>>> dm = build_datamodule({"name": "mnist5k", "root": "data", "batch_size": 64})
>>> dm.setup("fit")
>>> images, labels = next(iter(dm.train_dataloader()))   # float32 (64, 1, 28, 28), int64 (64,)

``DATASET_NAMES`` lists the datasets; ``DataConfig`` documents every option; ``plan_data``
applies ``data.mode`` (load whole, or stream from shards). Files that are missing raise
``DatasetNotFoundError``, files that are there but unusable ``DataError``; both name the file.

The modules, lowest first (each imports only modules on its line or above it):

    errors, config           the options and their checks
    arrays, folder, sources  tensors in memory, image files, downloaded datasets
    embedded                 the mnist5k set that ships with the repository
    datamodules              in-memory and image-folder datamodules
    shard_format             the layout of shards: meta.json, index checks
    streaming                the datamodule that streams shards (imports litdata)
    factory                  build_datamodule: the datamodule for a data.name
    shards                   the converter, ``python -m vit.data.shards``
    plan                     data.mode: memory, stream or auto
"""
from vit.data.arrays import BatchTransform, TensorImageDataset
from vit.data.config import DATASET_NAMES, DataConfig, resolve_config
from vit.data.datamodules import ArrayDataModule, ImageFolderDataModule, VisionDataModule
from vit.data.errors import DataError, DatasetNotFoundError
from vit.data.factory import build_datamodule
from vit.data.plan import plan_data

__all__ = [
    "DATASET_NAMES", "ArrayDataModule", "BatchTransform", "DataConfig", "DataError", "DatasetNotFoundError",
    "ImageFolderDataModule", "TensorImageDataset", "VisionDataModule", "build_datamodule", "plan_data",
    "resolve_config",
]
