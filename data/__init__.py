"""Dataset readers and image loading.

Every reader yields :class:`ImageRecord` values: the image path relative to the
dataset root, the identity (or None), the split (or None) and whatever
annotations the dataset provides; what a reader saw and did not list is in
``DatasetListing.skipped``, each path with a reason. Image decoding lives in one place,
:func:`load_image`, which never crashes on bad input: it raises
:class:`ImageLoadError` with a reason.
"""

from data.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image, load_image_bytes
from data.records import DatasetListing, ImageRecord, Skipped, skipped_summary
from data.readers import FORMATS, read_dataset

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DatasetListing",
    "FORMATS",
    "ImageLoadError",
    "ImageRecord",
    "Skipped",
    "load_image",
    "load_image_bytes",
    "read_dataset",
    "skipped_summary",
]
