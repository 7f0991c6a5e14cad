"""The registry of source kinds that open_feeds dispatches through."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.data import FeedSource, InputSpec, open_feeds, register_source, source_kinds

X = (InputSpec("x", np.dtype("float32"), (None, 2)),)


class Recorded:
    """A source no built-in kind reads: samples kept in an object of its own."""

    def __init__(self, x: np.ndarray):
        self.x = x


def test_the_built_in_kinds_are_tried_most_specific_first():
    kinds = source_kinds()
    assert kinds[:2] == ["array", "dict of arrays"]
    assert kinds.index("module:function") < kinds.index("missing path") < kinds.index("image folder")
    assert kinds.index("image folder") < kinds.index("NumPy files") < kinds.index("callable")
    assert kinds[-1] == "iterable of feeds"


def test_a_new_kind_of_source_is_one_registered_opener():
    @register_source("recorded samples", lambda s: isinstance(s, Recorded), priority=5)
    def open_recorded(source, inputs, image_options, role):
        return FeedSource(lambda: iter([{"x": source.x}]), len(source.x), "recorded", inputs)

    assert source_kinds().index("recorded samples") == 1  # between "array" (0) and "dict of arrays" (10)
    feeds = open_feeds(Recorded(np.ones((3, 2), np.float32)), X)
    assert feeds.num_samples == 3 and next(iter(feeds.batches(3)))["x"].shape == (3, 2)
    with pytest.raises(ValueError, match="'recorded samples' is already registered"):
        register_source("recorded samples", lambda s: False, priority=99)(open_recorded)
