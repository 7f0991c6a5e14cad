"""``open_feeds``: any supported data source for a model's inputs, through a registry of source kinds.

Each kind is a test (``accepts(source)``) and an opener (``open(source, inputs, image_options, role)``),
registered with :func:`register_source` by the module that reads that kind (:mod:`lowbit.data.arrays`,
:mod:`lowbit.data.images`, :mod:`lowbit.data.functions`); kinds are tried in order of ``priority``. Adding a kind of
source is one module and its registration.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.data.feeds import DataError, FeedSource, InputSpec, check_feed, check_finite, describe_inputs, samples_in

Opener = Callable[[Any, tuple[InputSpec, ...], Any, str], FeedSource]


@dataclass(frozen=True)
class SourceKind:
    name: str
    accepts: Callable[[Any], bool]
    open: Opener
    priority: int


_KINDS: dict[str, SourceKind] = {}


def register_source(name: str, accepts: Callable[[Any], bool], priority: int) -> Callable[[Opener], Opener]:
    """Decorator: make ``fn(source, inputs, image_options, role) -> FeedSource`` the opener of the sources
    ``accepts`` recognises, known as ``name``; lower ``priority`` is tried first. A second kind of the same name is
    an error. A new kind is one module (imported by :mod:`lowbit.data`)::

        @register_source("feather file", lambda s: str(s).endswith(".feather"), priority=45)
        def open_feather(source, inputs, image_options, role) -> FeedSource: ...
    """

    def add(fn: Opener) -> Opener:
        if name in _KINDS:
            raise ValueError(f"a kind of data source named {name!r} is already registered")
        _KINDS[name] = SourceKind(name, accepts, fn, priority)
        return fn

    return add


def _in_order() -> list[SourceKind]:
    return sorted(_KINDS.values(), key=lambda k: k.priority)


def source_kinds() -> list[str]:
    """The registered kinds of source, in the order :func:`open_feeds` tries them."""
    return [k.name for k in _in_order()]


def open_feeds(
    source: Any, inputs: Sequence[InputSpec], *, image_options: Any = None, role: str = "calibration data"
) -> FeedSource:
    """A :class:`FeedSource` for the model inputs ``inputs`` from any supported source:

    - a path: .npz (arrays keyed by input name, first axis = samples), .npy (one-input models), a folder of
      .npz / .npy files, or a folder of images (preprocessed as ``image_options``, an
      :class:`lowbit.data.ImageOptions`, says);
    - ``"module:function"``: a function that returns an iterable of feed dicts;
    - in Python: an array (one-input models; first axis = samples), a dict of arrays, an iterable of feed dicts,
      or a callable returning one.

    ``role`` ("calibration data", "evaluation data") names data that has no file name in messages.
    """
    inputs = tuple(inputs)
    for kind in _in_order():
        if kind.accepts(source):
            return kind.open(source, inputs, image_options, role)
    raise DataError(f"cannot read {role} from a {type(source).__name__}")


def is_path(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike))


@register_source("array", lambda s: isinstance(s, np.ndarray), priority=0)
def _open_array(source: np.ndarray, inputs, image_options, role: str) -> FeedSource:
    if len(inputs) != 1:
        raise DataError(
            f"{role}: one array feeds a one-input model, but the model has {len(inputs)} inputs "
            f"({describe_inputs(inputs)}); pass a dict of input name -> array"
        )
    return _open_mapping({inputs[0].name: source}, inputs, image_options, role)


@register_source("dict of arrays", lambda s: isinstance(s, Mapping), priority=10)
def _open_mapping(source: Mapping, inputs, image_options, role: str) -> FeedSource:
    feed = check_feed(source, inputs, role)
    check_finite(feed, role)
    return FeedSource(lambda: iter([feed]), samples_in(feed), role, inputs)


@register_source("missing path", lambda s: is_path(s) and not Path(s).exists(), priority=30)
def _missing(source, inputs, image_options, role: str) -> FeedSource:
    raise DataError(
        f"{Path(source)} does not exist; {role} is a .npz/.npy file, a folder of them or of images, or module:function"
    )


@register_source("callable", lambda s: callable(s) and not is_path(s), priority=80)
def _open_callable(source, inputs, image_options, role: str) -> FeedSource:
    return FeedSource(lambda: iter(source()), None, getattr(source, "__name__", role), inputs)


@register_source("iterable of feeds", lambda s: isinstance(s, Iterable) and not is_path(s), priority=90)
def _open_iterable(source, inputs, image_options, role: str) -> FeedSource:
    items = source if isinstance(source, (list, tuple)) else list(source)
    return FeedSource(lambda: iter(items), None, role, inputs)
