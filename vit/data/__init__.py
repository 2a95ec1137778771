"""Datasets for training and evaluating image classifiers, as Lightning datamodules.

>>> from vit.data import build_datamodule
>>> dm = build_datamodule({"name": "mnist5k", "root": "data", "batch_size": 64})
>>> dm.setup("fit")
>>> images, labels = next(iter(dm.train_dataloader()))   # float32 (64, 1, 28, 28), int64 (64,)

``DATASET_NAMES`` lists the datasets; ``DataConfig`` documents every option.
"""
from vit.data.arrays import BatchTransform, TensorImageDataset
from vit.data.config import DATASET_NAMES, DataConfig, resolve_config
from vit.data.datamodules import ArrayDataModule, ImageFolderDataModule, VisionDataModule, build_datamodule
from vit.data.errors import DatasetNotFoundError

__all__ = [
    "DATASET_NAMES", "ArrayDataModule", "BatchTransform", "DataConfig", "DatasetNotFoundError",
    "ImageFolderDataModule", "TensorImageDataset", "VisionDataModule", "build_datamodule", "resolve_config",
]
