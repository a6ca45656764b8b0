"""The data layer: any supported dataset layout -> train/val/test samples -> image tensors.

`load_splits` reads a dataset (image folders, list files, or the Piggyback paper's datasets in
their official download layouts) into `DatasetSplits`; `ImageDataset` serves the samples of one
split through the transforms of `build_transforms`.
"""

from piggyback.data.dataset import ImageDataset, UnreadableImageWarning, load_rgb
from piggyback.data.loading import DOWNLOADABLE, FORMATS, detect_format, load_splits
from piggyback.data.splits import DatasetSplits, Sample, stratified_holdout
from piggyback.data.transforms import build_transforms, resize_size

__all__ = [
    "DOWNLOADABLE",
    "FORMATS",
    "DatasetSplits",
    "ImageDataset",
    "Sample",
    "UnreadableImageWarning",
    "build_transforms",
    "detect_format",
    "load_rgb",
    "load_splits",
    "resize_size",
    "stratified_holdout",
]
