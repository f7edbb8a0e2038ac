"""The toy world's zero-shot OOD benchmark and the demo's detector set.

The evaluation side is imported inside the functions, so importing :mod:`vlmood.toyworld` (which the encoders'
registry does to load the shipped model) never loads it.
"""
from __future__ import annotations

from typing import Any

from .world import ID_SHAPES, OOD_SHAPES, World


def load_images(seed: int, n: int, shapes=ID_SHAPES, empty: bool = False):
    """``n`` PIL images (and their shape names) of the given shapes, or of empty backgrounds."""
    from PIL import Image

    world = World(seed, shapes=shapes, p_empty=0.0)
    arrays, _, scenes = world.batch(n, empty=True if empty else False)
    return [Image.fromarray(a) for a in arrays], [s.shape for s in scenes]


def benchmark(n: int = 300, seed: int = 2024):
    """The world's OOD benchmark: ID = 6 shapes (labelled), near-OOD = the 6 other shapes, far-OOD = no object.

    Images are generated in memory from seeds that training never used.
    """
    from ..data import MemorySource
    from ..evaluation import Benchmark

    id_imgs, id_labels = load_images(seed, n, ID_SHAPES)
    near, _ = load_images(seed + 1, n, OOD_SHAPES)
    far, _ = load_images(seed + 2, n, empty=True)
    return Benchmark(
        id=MemorySource(id_imgs, id_labels, name="toyworld-id"),
        ood={"near": {"other shapes": MemorySource(near, name="other-shapes")},
             "far": {"empty backgrounds": MemorySource(far, name="empty")}},
        classes=list(ID_SHAPES), name="toy world: 6 ID shapes vs 6 other shapes (near) and empty backgrounds (far)",
    )


def demo_detectors() -> dict[str, Any]:
    """Every detector, configured for the world (NegLabel/CSP mine from the world's lexicon; CLIPN's CTW and ATD
    use the no side that ships for the world's CLIP, ``assets/toyworld-clipn.safetensors``, with the world's prompt
    ``a photo of a {}``)."""
    from . import lexicon_dir

    lex = str(lexicon_dir())
    no_shapes = [str(p) for p in sorted(lexicon_dir().glob("*.txt")) if p.name != "noun.shape.txt"]
    common = {"lexicon": lex, "ratio": 0.5, "ngroups": 1}
    return {
        "mcm": "mcm", "glmcm": "glmcm", "energy": "energy", "maxlogit": "maxlogit",
        "neglabel": {"method": "neglabel", **common},
        "neglabel (no shape nouns)": {"method": "neglabel", **common, "lexicon": no_shapes},
        "csp": {"method": "csp", **common},
        "clipn-ctw": {"method": "clipn", "templates": "simple"},
        "clipn-atd": {"method": "clipnatd", "templates": "simple"},
    }
