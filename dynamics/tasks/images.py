"""Images without downloads: matplotlib's bundled sample data, procedurally drawn scenes, probe pictures,
and cutting an image into an ``m x n`` grid of patches (row-major) and composing patches back.

Built-in photos come from files that ship with matplotlib (``grace_hopper.jpg`` and two elevation maps rendered
with hill shading); each jigsaw image is a random crop of one of them or a freshly drawn scene (sky, sun,
hills, houses, trees), all determined by the seed.
"""

from __future__ import annotations

import random
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dynamics.errors import DynamicsError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (240, 210, 20),
           "orange": (245, 140, 20), "purple": (140, 40, 170), "black": (10, 10, 10)}
SHAPES = ("circle", "square", "triangle")


# ------------------------------------------------------------------------------------------------ sources
@lru_cache(maxsize=1)
def sample_photos() -> tuple[Image.Image, ...]:
    """matplotlib's bundled photo and two hill-shaded elevation maps, as RGB images."""
    import matplotlib.cbook as cbook
    from matplotlib import colormaps
    from matplotlib.colors import LightSource

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    shaded = []
    for name, key, cmap in (("jacksboro_fault_dem.npz", "elevation", "gist_earth"), ("topobathy.npz", "topo", "terrain")):
        with np.load(cbook.get_sample_data(name, asfileobj=False)) as data:
            z = data[key].astype(float)
        rgb = LightSource(azdeg=315, altdeg=45).shade(z, cmap=colormaps[cmap], blend_mode="soft", vert_exag=2)
        img = Image.fromarray((rgb[..., :3] * 255).astype(np.uint8))
        shaded.append(img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC))
    return (photo, *shaded)


def random_crop(rng: random.Random, width: int, height: int) -> Image.Image:
    """A random crop (40-100% of the largest fitting box) of a sample photo, resized to ``width x height``."""
    src = rng.choice(sample_photos())
    aspect = width / height
    box_w = min(src.width, src.height * aspect)
    scale = rng.uniform(0.4, 1.0)
    cw, ch = box_w * scale, box_w * scale / aspect
    x0, y0 = rng.uniform(0, src.width - cw), rng.uniform(0, src.height - ch)
    return src.resize((width, height), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))


def _rand_colour(rng: random.Random, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    return tuple(rng.randint(lo, hi) for _ in range(3))  # type: ignore[return-value]


def draw_scene(rng: random.Random, width: int, height: int) -> Image.Image:
    """A landscape: sky gradient, sun, clouds, hills, ground, houses and trees at random places and colours."""
    top, bottom = _rand_colour(rng, 40, 200), _rand_colour(rng, 150, 255)
    t = np.linspace(0, 1, height)[:, None, None]
    sky = (np.array(top) * (1 - t) + np.array(bottom) * t).repeat(width, axis=1)
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.06, 0.12) * width
    sx, sy = rng.uniform(r, width - r), rng.uniform(r, 0.35 * height)
    d.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(255, rng.randint(180, 240), rng.randint(0, 90)))
    for _ in range(rng.randint(1, 3)):
        cx, cy, cw = rng.uniform(0, width), rng.uniform(0.05, 0.3) * height, rng.uniform(0.15, 0.3) * width
        d.ellipse((cx - cw / 2, cy - cw / 6, cx + cw / 2, cy + cw / 6), fill=(245, 245, 250))
    horizon = rng.uniform(0.5, 0.7) * height
    xs = np.linspace(0, width, 9)
    hills = [(x, horizon - rng.uniform(0.05, 0.25) * height) for x in xs]
    d.polygon([(0, height), *hills, (width, height)], fill=_rand_colour(rng, 40, 140))
    d.rectangle((0, horizon + 0.1 * height, width, height), fill=_rand_colour(rng, 60, 180))
    for _ in range(rng.randint(1, 3)):
        hw, hx = rng.uniform(0.12, 0.22) * width, rng.uniform(0, 0.8) * width
        hy = rng.uniform(horizon + 0.12 * height, 0.85 * height)
        d.rectangle((hx, hy - hw * 0.8, hx + hw, hy), fill=_rand_colour(rng))
        d.polygon([(hx - 0.1 * hw, hy - hw * 0.8), (hx + hw / 2, hy - hw * 1.4), (hx + 1.1 * hw, hy - hw * 0.8)],
                  fill=_rand_colour(rng, 80, 200))
        d.rectangle((hx + 0.4 * hw, hy - 0.4 * hw, hx + 0.6 * hw, hy), fill=(70, 40, 20))
    for _ in range(rng.randint(1, 4)):
        tx, ty, tr = rng.uniform(0, width), rng.uniform(horizon + 0.1 * height, height), rng.uniform(0.04, 0.08) * width
        d.rectangle((tx - tr / 4, ty - 2 * tr, tx + tr / 4, ty), fill=(100, 60, 30))
        d.ellipse((tx - tr, ty - 3.5 * tr, tx + tr, ty - 1.5 * tr), fill=(20, rng.randint(90, 170), 40))
    return img


def builtin_image(rng: random.Random, width: int, height: int) -> Image.Image:
    """Half the time a crop of a bundled photo, otherwise a drawn scene."""
    return random_crop(rng, width, height) if rng.random() < 0.5 else draw_scene(rng, width, height)


def folder_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DynamicsError("image folder not found", file=folder, field="source")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DynamicsError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder", file=folder, field="source")
    return paths


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop ``image`` to the aspect ``width:height`` and resize it to exactly that size."""
    image = image.convert("RGB")
    aspect = width / height
    w, h = image.size
    cw, ch = (min(w, h * aspect), min(h, w / aspect))
    x0, y0 = (w - cw) / 2, (h - ch) / 2
    return image.resize((width, height), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))


# ------------------------------------------------------------------------------------------------ patches
def cut(image: Image.Image, rows: int, cols: int) -> list[Image.Image]:
    """The ``rows x cols`` patches of ``image`` in row-major order (the size must divide evenly)."""
    pw, ph = image.width // cols, image.height // rows
    if pw * cols != image.width or ph * rows != image.height:
        raise ValueError(f"{image.size} does not split into {rows}x{cols} equal patches")
    return [image.crop((c * pw, r * ph, (c + 1) * pw, (r + 1) * ph)) for r in range(rows) for c in range(cols)]


def compose(patches: list[Image.Image], rows: int, cols: int) -> Image.Image:
    """Paste equal-sized patches row-major into one image (the inverse of :func:`cut`)."""
    pw, ph = patches[0].size
    out = Image.new("RGB", (pw * cols, ph * rows))
    for k, patch in enumerate(patches):
        out.paste(patch, ((k % cols) * pw, (k // cols) * ph))
    return out


# ------------------------------------------------------------------------------------------- probe pictures
def _shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> None:
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def draw_probe_image(category: str, rng: random.Random, size: int = 224) -> tuple[Image.Image, str, str]:
    """(image, question, answer) for a visual probe: ``colour``, ``shape``, ``count`` or ``position``."""
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    if category == "colour":
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        _shape(d, shape, size / 2, size / 2, size * 0.3, COLOURS[colour])
        return img, f"What color is the {shape} in the image?", colour
    if category == "shape":
        shape = rng.choice(SHAPES)
        _shape(d, shape, size / 2, size / 2, size * 0.3, COLOURS[rng.choice(list(COLOURS))])
        return img, "What shape is in the image?", shape
    if category == "count":
        k, colour = rng.randint(1, 5), rng.choice(list(COLOURS))
        cells = rng.sample(range(9), k)  # one circle per cell of a 3x3 grid: never overlapping
        for c in cells:
            _shape(d, "circle", (c % 3 + 0.5) * size / 3, (c // 3 + 0.5) * size / 3, size / 9, COLOURS[colour])
        return img, "How many circles are in the image?", str(k)
    if category == "position":
        side = rng.choice(("left", "right"))
        cx = size * (0.25 if side == "left" else 0.75)
        _shape(d, "circle", cx, rng.uniform(0.3, 0.7) * size, size * 0.15, COLOURS["red"])
        return img, "Is the red circle on the left or the right side of the image?", side
    raise ValueError(f"unknown visual probe category {category!r}")
