"""A folder of images as model input, with the preprocessing stated explicitly (needs Pillow).

Each image: converted to RGB (or L for one-channel inputs), its shorter side resized to ``resize``, the centre
``size`` x ``size`` cropped, scaled by ``scale`` (1/255: [0, 1]), normalised ``(x - mean) / std`` per channel,
channels reversed for ``bgr``, laid out NCHW or NHWC.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.data.feeds import DataError, Feed, FeedSource, InputSpec, describe_inputs
from lowbit.data.sources import is_path, register_source

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_CHUNK = 32


@dataclass(frozen=True)
class ImageOptions:
    """Preprocessing of an image folder. ``size`` defaults to the model's input size; ``resize`` (the shorter
    side before the centre crop) to ``size``; ``layout`` to what the input's shape says (channels 1 or 3 on
    axis 1: NCHW)."""

    size: int | tuple[int, int] | None = None
    resize: int | None = None
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    scale: float = 1 / 255
    bgr: bool = False
    layout: str | None = None

    def __post_init__(self):
        sizes = (self.size,) if isinstance(self.size, (int, np.integer)) or self.size is None else tuple(self.size)
        if len(sizes) not in (1, 2) or not all(s is None or _positive_int(s) for s in sizes):
            raise DataError(
                f"the image size (--image-size, ImageOptions.size) must be a positive integer or a pair of them, "
                f"got {self.size!r}"
            )
        if self.resize is not None and not _positive_int(self.resize):
            raise DataError(
                f"the resize size (--resize, ImageOptions.resize) must be a positive integer, got {self.resize!r}"
            )
        for option, values in (("mean", self.mean), ("std", self.std)):
            try:
                values = np.asarray(values, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                values = np.array([np.nan])
            if values.size == 0 or not np.all(np.isfinite(values)):
                raise DataError(
                    f"the image {option} (--{option}, ImageOptions.{option}) must be one finite number or one per "
                    f"channel, got {getattr(self, option)!r}"
                )
        if np.any(np.asarray(self.std, dtype=np.float64) == 0):
            raise DataError(f"the image std (--std, ImageOptions.std) must not contain 0, got {self.std!r}")
        if not (isinstance(self.scale, (int, float, np.number)) and np.isfinite(self.scale) and self.scale > 0):
            raise DataError(f"the pixel scale (--scale, ImageOptions.scale) must be positive, got {self.scale!r}")
        if self.layout not in (None, "nchw", "nhwc"):
            raise DataError(
                f"the image layout (--layout, ImageOptions.layout) must be 'nchw' or 'nhwc', got {self.layout!r}"
            )


def _positive_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` or in its subfolders (class folders), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def _geometry(spec: InputSpec, options: ImageOptions) -> tuple[str, int, tuple[int, int]]:
    if len(spec.shape) != 4:
        raise DataError(
            f"an image folder feeds a 4-D input (N, C, H, W or N, H, W, C); the model's input is {spec.describe()}"
        )
    layout = options.layout or ("nchw" if spec.shape[1] in (1, 3) else "nhwc")
    channels, h, w = (spec.shape[1], *spec.shape[2:]) if layout == "nchw" else (spec.shape[3], *spec.shape[1:3])
    if options.size is not None:
        h, w = (options.size, options.size) if isinstance(options.size, (int, np.integer)) else options.size
    if h is None or w is None:
        raise DataError(f"the model's input {spec.describe()} has a free image size; give the size (--image-size)")
    if channels not in (1, 3):
        raise DataError(f"image input {spec.describe()} must have 1 or 3 channels (layout {layout})")
    for option, values in (("mean", options.mean), ("std", options.std)):
        count = np.asarray(values).size
        if count not in (1, channels):
            raise DataError(
                f"--{option} (ImageOptions.{option}) has {count} values but the model's input {spec.describe()} "
                f"has {channels} channel{'s' if channels > 1 else ''}: give "
                + ("1 value" if channels == 1 else f"1 value or {channels}")
            )
    return layout, channels, (int(h), int(w))


def load_image(path: Path, channels: int, size: tuple[int, int], options: ImageOptions) -> np.ndarray:
    """One preprocessed image as float32 (H, W, C)."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading a folder of images needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            h, w = size
            short = options.resize or max(h, w)
            ratio = short / min(image.size)
            image = image.resize(
                (max(w, round(image.size[0] * ratio)), max(h, round(image.size[1] * ratio))), Image.BILINEAR
            )
            left, top = (image.size[0] - w) // 2, (image.size[1] - h) // 2
            array = np.asarray(image.crop((left, top, left + w, top + h)), dtype=np.float32)
    except OSError as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from None
    if array.ndim == 2:
        array = array[:, :, None]
    array = array * np.float32(options.scale)
    array = (array - np.asarray(options.mean, np.float32)) / np.asarray(options.std, np.float32)
    if options.bgr:
        array = array[:, :, ::-1]
    return array


def image_source(folder: Path, spec: InputSpec, options: ImageOptions | None = None) -> FeedSource:
    options = options or ImageOptions()
    files = list_images(folder)
    layout, channels, size = _geometry(spec, options)
    if np.dtype(spec.dtype) != np.float32:
        raise DataError(f"an image folder gives float32 input; the model's input is {spec.describe()}")

    def chunks() -> Iterator[Feed]:
        for start in range(0, len(files), _CHUNK):
            batch = np.stack([load_image(f, channels, size, options) for f in files[start : start + _CHUNK]])
            if layout == "nchw":
                batch = batch.transpose(0, 3, 1, 2)
            yield {spec.name: np.ascontiguousarray(batch, dtype=np.float32)}

    return FeedSource(chunks, len(files), f"{folder} ({len(files)} images)", (spec,))


def _is_image_folder(source) -> bool:
    return is_path(source) and Path(source).is_dir() and bool(list_images(Path(source)))


@register_source("image folder", _is_image_folder, priority=40)
def _open_images(source, inputs, image_options, role: str) -> FeedSource:
    path = Path(source)
    if len(inputs) != 1:
        raise DataError(f"{path} holds images, but the model has {len(inputs)} inputs: {describe_inputs(inputs)}")
    return image_source(path, inputs[0], image_options)
