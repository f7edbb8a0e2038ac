"""The toy world: procedural 64x64 images of coloured shapes with captions, deterministic in a seed.

Vectorised in numpy (a batch of images is rendered at once), fast enough to train on the fly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "ring", "arrow", "moon", "diamond", "hexagon",
          "pentagon")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
    "orange": (240, 140, 30), "purple": (140, 60, 180), "pink": (240, 120, 180), "brown": (130, 80, 40),
}
SIZES = ("small", "large")
FILLS = ("solid", "striped", "dotted")
BACKGROUNDS = ("plain", "gradient", "noise")
ID_SHAPES = SHAPES[:6]  # circle, square, triangle, star, heart, cross
OOD_SHAPES = SHAPES[6:]  # ring, arrow, moon, diamond, hexagon, pentagon

_PLURAL = {s: s + ("es" if s == "cross" else "s") for s in SHAPES}
_BG_WORDS = {"plain": "plain", "gradient": "gradient", "noise": "noisy"}


@dataclass
class Scene:
    """What one image shows: ``shape`` is None for an empty background."""

    shape: str | None
    colour: str | None
    size: str | None
    fill: str | None
    background: str
    count: int


def _polygon(r, th, n, phase):
    a = np.mod(th - phase, 2 * np.pi / n) - np.pi / n
    return r <= np.cos(np.pi / n) / np.cos(a)


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in unit coordinates (the shape spans about [-1, 1]); ``v`` points up."""
    r, th = np.hypot(u, v), np.arctan2(v, u)
    if shape == "circle":
        return r <= 0.95
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.6)
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "triangle":
        return _polygon(r / 1.05, th, 3, np.pi / 2)
    if shape == "pentagon":
        return _polygon(r, th, 5, np.pi / 2)
    if shape == "hexagon":
        return _polygon(r, th, 6, 0.0)
    if shape == "star":
        return r <= 0.42 + 0.6 * (0.5 + 0.5 * np.cos(5 * (th - np.pi / 2))) ** 2.5
    if shape == "heart":
        x, y = u * 1.25, v * 1.25 + 0.25
        return (x ** 2 + y ** 2 - 1) ** 3 - x ** 2 * y ** 3 <= 0
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "arrow":
        shaft = (np.abs(v) <= 0.18) & (u >= -0.95) & (u <= 0.2)
        head = (u >= 0.1) & (u <= 1.0) & (np.abs(v) <= 0.75 * (1.0 - u) / 0.9)
        return shaft | head
    if shape == "moon":
        return (r <= 0.95) & (np.hypot(u - 0.45, v - 0.2) > 0.8)
    raise ValueError(f"unknown shape {shape!r}")


class World:
    """Samples scenes and renders them with captions.

    Args:
        seed: the generator's seed; the same seed gives the same images and captions.
        shapes: the shapes objects are drawn from (default all 12).
        p_empty: probability of an image with no object; ``p_two``: of two objects of the same kind.
    """

    def __init__(self, seed: int = 0, shapes: Sequence[str] = SHAPES, p_empty: float = 0.05, p_two: float = 0.12):
        unknown = [s for s in shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; the world has {SHAPES}")
        self.rng = np.random.default_rng(seed)
        self.shapes = tuple(shapes)
        self.p_empty, self.p_two = p_empty, p_two
        yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
        self._x, self._y = xx + 0.5, yy + 0.5

    # ------------------------------------------------------------------ scenes
    def sample_scenes(self, n: int, empty: bool | None = None) -> list[Scene]:
        rng, out = self.rng, []
        for _ in range(n):
            bg = BACKGROUNDS[rng.integers(3)]
            if empty or (empty is None and rng.random() < self.p_empty):
                out.append(Scene(None, None, None, None, bg, 0))
                continue
            count = 2 if rng.random() < self.p_two else 1
            out.append(Scene(self.shapes[rng.integers(len(self.shapes))], list(COLOURS)[rng.integers(8)],
                             "small" if count == 2 else SIZES[rng.integers(2)], FILLS[rng.integers(3)], bg, count))
        return out

    # ------------------------------------------------------------------ rendering
    def _background(self, kind: str) -> np.ndarray:
        rng = self.rng
        g = rng.uniform(90, 200)
        if kind == "plain":
            img = np.full((SIZE, SIZE), g, np.float32)
        elif kind == "gradient":
            g2 = np.clip(g + rng.choice([-1, 1]) * rng.uniform(50, 90), 40, 240)
            a = rng.uniform(0, 2 * np.pi)
            t = ((self._x - 32) * np.cos(a) + (self._y - 32) * np.sin(a)) / 90 + 0.5
            img = g + (g2 - g) * np.clip(t, 0, 1)
        else:
            img = g + rng.normal(0, 14, (SIZE, SIZE)).astype(np.float32)
        return np.repeat(img[..., None], 3, axis=2)

    def _draw(self, img: np.ndarray, scene: Scene, cx: float, cy: float, radius: float) -> None:
        rng = self.rng
        rot = rng.uniform(-0.35, 0.35)
        # work inside the shape's bounding box only (shapes span at most ~1.1 radii from their centre)
        x0, x1 = max(0, int(cx - 1.35 * radius)), min(SIZE, int(cx + 1.35 * radius) + 2)
        y0, y1 = max(0, int(cy - 1.35 * radius)), min(SIZE, int(cy + 1.35 * radius) + 2)
        img = img[y0:y1, x0:x1]
        xs, ys = self._x[y0:y1, x0:x1], self._y[y0:y1, x0:x1]
        dx, dy = (xs - cx) / radius, (cy - ys) / radius
        u = dx * np.cos(rot) + dy * np.sin(rot)
        v = -dx * np.sin(rot) + dy * np.cos(rot)
        mask = shape_mask(scene.shape, u, v)
        colour = np.array(COLOURS[scene.colour], np.float32) + rng.normal(0, 8, 3)
        pale = np.clip(colour * 0.35 + 165, 0, 255)  # a pale tint of the same hue
        img[mask] = colour
        if scene.fill == "striped":
            period = rng.uniform(5, 8)
            stripes = np.mod(xs * np.cos(0.8 + rot) + ys * np.sin(0.8 + rot), period) < period / 2
            img[mask & stripes] = pale
        elif scene.fill == "dotted":
            dots = (np.mod(xs, 6) - 3) ** 2 + (np.mod(ys, 6) - 3) ** 2 <= 2.6
            img[mask & dots] = pale

    def render(self, scene: Scene) -> np.ndarray:
        """``[64, 64, 3]`` uint8 image of a scene."""
        rng = self.rng
        img = self._background(scene.background)
        if scene.shape is not None:
            if scene.count == 1:
                radius = rng.uniform(19, 25) if scene.size == "large" else rng.uniform(10, 14)
                c = rng.uniform(32 - (30 - radius) * 0.5, 32 + (30 - radius) * 0.5, 2)
                self._draw(img, scene, c[0], c[1], radius)
            else:
                radius = rng.uniform(9, 12)
                horizontal = rng.random() < 0.5
                a, b = rng.uniform(15, 20), rng.uniform(44, 49)
                m = rng.uniform(27, 37)
                for p in (a, b):
                    self._draw(img, scene, *((p, m) if horizontal else (m, p)), radius)
        return np.clip(np.rint(img), 0, 255).astype(np.uint8)

    # ------------------------------------------------------------------ captions
    def caption(self, scene: Scene) -> str:
        rng = self.rng
        if scene.shape is None:
            bg = _BG_WORDS[scene.background]
            return str(rng.choice([f"an empty {bg} background", "an empty gray background", "a blank background",
                                   f"a photo of an empty {bg} background", "nothing on a gray background"]))
        words = []
        if scene.count == 1 and rng.random() < 0.3:
            words.append(scene.size)
        if rng.random() < 0.85:
            words.append(scene.colour)
        if scene.fill != "solid" and rng.random() < 0.5:
            words.append(scene.fill)
        if scene.count == 2:
            desc = " ".join(["two"] + words + [_PLURAL[scene.shape]])
            return str(rng.choice([desc, f"a photo of {desc}", f"{desc} on a {_BG_WORDS[scene.background]} background"]))
        desc = " ".join(words + [scene.shape])
        art = "an" if desc[0] in "aeiou" else "a"
        bg = _BG_WORDS[scene.background]
        return str(rng.choice([f"{art} {desc}", f"a photo of {art} {desc}", f"{art} {desc} on a {bg} background",
                               f"an image of {art} {desc}", f"a picture of {art} {desc}"]))

    def batch(self, n: int, empty: bool | None = None) -> tuple[np.ndarray, list[str], list[Scene]]:
        """``n`` images ``[n, 64, 64, 3]`` uint8 with captions and scenes."""
        scenes = self.sample_scenes(n, empty)
        images = np.stack([self.render(s) for s in scenes]) if n else np.empty((0, SIZE, SIZE, 3), np.uint8)
        return images, [self.caption(s) for s in scenes], scenes


def vocabulary() -> list[str]:
    """Every word a caption or a zero-shot prompt of this world can use, in a fixed order."""
    words = ["a", "an", "the", "of", "on", "photo", "image", "picture", "two", "empty", "blank", "nothing", "gray",
             "background", "this", "is", "nice", "good", "close", "up", "with", "it"]
    words += list(SIZES) + list(FILLS) + list(COLOURS) + list(SHAPES) + [_PLURAL[s] for s in SHAPES]
    words += list(_BG_WORDS.values()) + ["environment", "space", "object", "scene", "place", "item", "area", "view",
                                          "thing", "pattern", "structure", "landscape", "vista", "creature"]
    return list(dict.fromkeys(words))
