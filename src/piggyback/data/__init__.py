"""The data layer: any supported dataset layout -> train/val/test samples -> image tensors.

`load_splits` reads a dataset (image folders, list files, or the Piggyback paper's datasets in
their official download layouts) into `DatasetSplits`; `ImageDataset` serves the samples of one
split through the transforms of `build_transforms`.
"""

from piggyback.lazy import lazy_exports

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
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "piggyback.data.dataset": ("ImageDataset", "UnreadableImageWarning", "load_rgb"),
        "piggyback.data.formats": ("DOWNLOADABLE", "FORMATS"),
        "piggyback.data.loading": ("detect_format", "load_splits"),
        "piggyback.data.splits": ("DatasetSplits", "Sample", "stratified_holdout"),
        "piggyback.data.transforms": ("build_transforms", "resize_size"),
    },
)
