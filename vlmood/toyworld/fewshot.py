"""Few-shot training splits of the toy world, for prompt learning (CoOp, LoCoOp).

A *clean* image shows one ID shape, as in :func:`vlmood.toyworld.load_images`. A *cluttered* image shows one ID
shape (its label) and, in another quadrant, a distractor: a shape that is not an ID class. The toy model's image
tower has a 2x2 grid of local features (one per 32x32 quadrant), so each object lies mostly in its own local
region; the quadrants without the ID shape are the ID-irrelevant regions LoCoOp's entropy term is meant to find.

Distractors are drawn from ``DISTRACTOR_SHAPES`` (ring, arrow, moon: half of the near-OOD shapes), so the
other half (diamond, hexagon, pentagon) stays unseen in training and an evaluation can tell the two apart.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .world import BACKGROUNDS, COLOURS, FILLS, ID_SHAPES, OOD_SHAPES, Scene, World

DISTRACTOR_SHAPES = OOD_SHAPES[:3]
"""Shapes used as clutter beside the ID shape in cluttered training images (ring, arrow, moon)."""
UNSEEN_SHAPES = OOD_SHAPES[3:]
"""Near-OOD shapes never shown in a training split (diamond, hexagon, pentagon)."""
KINDS = ("clean", "cluttered")
_SEED_TAG = 8  # keeps these generators apart from the integer seeds other toy-world sets use
_QUADRANTS = ((16.0, 16.0), (48.0, 16.0), (16.0, 48.0), (48.0, 48.0))  # (x, y) centres of the 2x2 grid


def _object(world: World, shape: str) -> Scene:
    rng = world.rng
    return Scene(shape, list(COLOURS)[rng.integers(len(COLOURS))], "small", FILLS[rng.integers(len(FILLS))],
                 "plain", 1)


def cluttered_image(world: World, shape: str, distractors: Sequence[str] = DISTRACTOR_SHAPES) -> np.ndarray:
    """One ``[64, 64, 3]`` uint8 image: ``shape`` in a random quadrant, a random distractor in another."""
    rng = world.rng
    img = world._background(BACKGROUNDS[rng.integers(len(BACKGROUNDS))])
    q_id, q_other = rng.choice(len(_QUADRANTS), size=2, replace=False)
    for q, name in ((q_id, shape), (q_other, distractors[rng.integers(len(distractors))])):
        radius = rng.uniform(10, 13)
        cx, cy = np.array(_QUADRANTS[q]) + rng.uniform(-2.5, 2.5, 2)
        world._draw(img, _object(world, name), float(cx), float(cy), float(radius))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def few_shot_images(seed: int, per_class: int, kind: str = "cluttered", shapes: Sequence[str] = ID_SHAPES,
                    distractors: Sequence[str] = DISTRACTOR_SHAPES):
    """``per_class`` labelled PIL images of each shape in ``shapes`` (class by class) and their labels.

    ``kind="clean"``: one shape per image, as the world draws it; ``"cluttered"``: the shape plus a distractor
    (see the module docstring). Deterministic in ``seed``.
    """
    from PIL import Image

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    images, labels = [], []
    for i, shape in enumerate(shapes):
        world = World([_SEED_TAG, seed, i], shapes=[shape], p_empty=0.0, p_two=0.0)  # type: ignore[arg-type]
        if kind == "clean":
            arrays = world.batch(per_class, empty=False)[0]
        else:
            arrays = np.stack([cluttered_image(world, shape, distractors) for _ in range(per_class)])
        images += [Image.fromarray(a) for a in arrays]
        labels += [shape] * per_class
    return images, labels


def few_shot_source(seed: int, per_class: int, kind: str = "cluttered", shapes: Sequence[str] = ID_SHAPES):
    """:func:`few_shot_images` as a labelled :class:`vlmood.data.MemorySource` (what ``fit`` takes)."""
    from ..data import MemorySource

    images, labels = few_shot_images(seed, per_class, kind, shapes)
    return MemorySource(images, labels, name=f"toyworld-{kind}-train-{seed}")


__all__ = ["DISTRACTOR_SHAPES", "KINDS", "UNSEEN_SHAPES", "cluttered_image", "few_shot_images",
           "few_shot_source"]
