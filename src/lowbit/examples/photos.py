"""The real photos scikit-image and scikit-learn ship, and seeded random crops of them."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lowbit.examples.common import ExampleError, package_dir

SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "microaneurysms.png", "moon.png",
    "motorcycle_left.png", "motorcycle_right.png", "page.png", "retina.jpg", "rocket.jpg", "text.png",
)  # fmt: skip
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
PHOTOS_INSTALL = "scikit-image scikit-learn"


def pil_image():
    try:
        from PIL import Image
    except ImportError:
        raise ExampleError("the photo examples need Pillow: pip install pillow") from None
    return Image


def photos() -> list[tuple[str, np.ndarray]]:
    """The real photographs shipped by scikit-image and scikit-learn, as (name, RGB uint8 (H, W, 3)), read with
    Pillow straight from the packages' data folders (neither package is imported)."""
    Image = pil_image()

    files = [package_dir("skimage", PHOTOS_INSTALL) / "data" / n for n in SKIMAGE_PHOTOS]
    files += [package_dir("sklearn", PHOTOS_INSTALL) / "datasets" / "images" / n for n in SKLEARN_PHOTOS]
    out = []
    for f in files:
        with Image.open(f) as image:
            out.append((f.stem, np.asarray(image.convert("RGB"))))
    return out


def photo_crops(count: int, seed: int, size: int = 224, images=None) -> Iterator[tuple[str, np.ndarray]]:
    """``count`` random crops of the photos, as (photo name, RGB uint8 (size, size, 3)): photos in turn, each crop
    covering 10-100% of the photo's area with an aspect ratio in [3/4, 4/3], flipped left-right half the time,
    resized (bilinear) to ``size``. The same seed gives the same crops."""
    Image = pil_image()

    images = images if images is not None else photos()
    rng = np.random.default_rng(seed)
    for i in range(count):
        name, photo = images[i % len(images)]
        h, w = photo.shape[:2]
        area = rng.uniform(0.1, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = min(h, round(np.sqrt(area / aspect))), min(w, round(np.sqrt(area * aspect)))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(photo[top : top + ch, left : left + cw]).resize((size, size), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        yield name, np.asarray(crop)
