"""Small synthetic image folders (coloured shapes) for the tests, the benchmark and trying the page out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

DEMO_CLASSES = ("circle", "square", "triangle")


def draw_shape(kind: str, size: int, rng: np.random.Generator, mode: str = "RGB"):
    """A PIL image of one shape (circle, square, triangle) of random colour, position and scale."""
    from PIL import Image, ImageDraw

    background = tuple(int(v) for v in rng.integers(200, 256, 3))
    im = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(im)
    colour = tuple(int(v) for v in rng.integers(0, 160, 3))
    r = size * rng.uniform(0.22, 0.4)
    cx, cy = rng.uniform(r, size - r, 2)
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return im.convert(mode)


def write_demo_images(
    folder: str | os.PathLike,
    per_class: int = 2,
    unlabeled: int = 30,
    size: int = 24,
    seed: int = 0,
    classes: tuple[str, ...] = DEMO_CLASSES,
) -> Path:
    """``folder/<class>/*.png`` (``per_class`` labeled images each) plus ``unlabeled`` flat images of every
    class; sizes and modes vary (RGB, grayscale, RGBA) as real folders do. Returns ``folder``."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for c in classes:
        (folder / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(c, size, rng).save(folder / c / f"{c}_{i}.png")
    for i in range(unlabeled):
        kind = classes[i % len(classes)]
        side = size + int(rng.integers(-4, 9))
        im = draw_shape(kind, side, rng)
        if i % 7 == 3:
            im = im.convert("L")
        elif i % 7 == 5:
            im = im.convert("RGBA")
            im.putalpha(Image.new("L", im.size, 255))
        im.save(folder / f"img_{i:04d}.png")
    return folder
