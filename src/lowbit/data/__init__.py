"""Data for calibration and evaluation.

Named tensors saved as NumPy files, streamed in batches along their first axis without loading a whole file into
memory (.npy files are memory-mapped); and feeds for a model: batches of its named inputs from arrays, image
folders or a Python function, each checked against what the model expects. :func:`open_feeds` dispatches through
a registry of source kinds (:mod:`lowbit.data.sources`), each read by a module of its own.
"""

from lowbit.data import arrays, functions, images  # noqa: F401 (each registers its kind of source)
from lowbit.data.arrays import tensor_batches
from lowbit.data.feeds import (
    Batches,
    DataError,
    Feed,
    FeedSource,
    InputSpec,
    check_feed,
    check_finite,
    describe_inputs,
    samples_in,
    whole_chunk,
)
from lowbit.data.functions import load_function
from lowbit.data.images import ImageOptions, image_source, list_images
from lowbit.data.sources import open_feeds, register_source, source_kinds

__all__ = [
    "Batches",
    "DataError",
    "Feed",
    "FeedSource",
    "ImageOptions",
    "InputSpec",
    "check_feed",
    "check_finite",
    "describe_inputs",
    "image_source",
    "list_images",
    "load_function",
    "open_feeds",
    "register_source",
    "samples_in",
    "source_kinds",
    "tensor_batches",
    "whole_chunk",
]
