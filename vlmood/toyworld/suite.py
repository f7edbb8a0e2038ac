"""The toy world written to disk as a benchmark suite: image folders in the layout a suite file describes, plus the
suite file itself, so that ``vlmood eval --suite FILE --root DIR`` and :func:`vlmood.evaluation.load_suite` run on
it exactly as on OpenOOD's data."""
from __future__ import annotations

import json
from pathlib import Path

from .bench import load_images
from .world import ID_SHAPES, OOD_SHAPES

SUITE = {
    "name": "toy world suite: 6 ID shapes vs 6 other shapes (near) and empty backgrounds (far)",
    "classes": list(ID_SHAPES),
    "id": "shapes/test",
    "ood": {"near": {"other shapes": "other-shapes"}, "far": {"empty backgrounds": "empty"}},
    "layout": [
        "ROOT/shapes/test/<class name>/*.png  ID test images in class-name folders (circle, square, ...)",
        "ROOT/other-shapes/*.png              near-OOD: the world's 6 other shapes",
        "ROOT/empty/*.png                     far-OOD: backgrounds without an object",
    ],
}


def write_suite(root: str | Path, n: int = 200, seed: int = 4040) -> Path:
    """Write ``n`` images per set under ``root`` in :data:`SUITE`'s layout, and the suite file
    ``root/toyworld-suite.json``; returns the suite file. Seeds differ from training's and the demo's."""
    root = Path(root)
    ids, labels = load_images(seed, n, ID_SHAPES)
    sets = {SUITE["id"]: (ids, labels), "other-shapes": (load_images(seed + 1, n, OOD_SHAPES)[0], None),
            "empty": (load_images(seed + 2, n, empty=True)[0], None)}
    for rel, (images, names) in sets.items():
        for i, im in enumerate(images):
            folder = root / rel / names[i] if names is not None else root / rel
            folder.mkdir(parents=True, exist_ok=True)
            im.save(folder / f"{i:04d}.png")
    path = root / "toyworld-suite.json"
    path.write_text(json.dumps(SUITE, indent=1) + "\n", encoding="utf-8")
    return path
