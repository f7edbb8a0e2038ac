"""The toy vision-language world: a procedural image generator, its lexicon, a tiny CLIP trained on it
(shipped in ``assets/``), zero-shot OOD benchmarks in the world, and the demo.

``vlmood.load_encoder("toyworld")`` loads the shipped model through the ordinary open_clip path.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .world import BACKGROUNDS, COLOURS, FILLS, ID_SHAPES, OOD_SHAPES, SHAPES, SIZES, Scene, World, vocabulary

ASSETS = Path(__file__).resolve().parent / "assets"
CHECKPOINT = ASSETS / "toyworld.safetensors"
ARCH = "vlmood-toyworld"
LEXICON_NAME = "toyworld"


def tokenizer_for(checkpoint: Path | None = None):
    """The word-level tokenizer of a toy-world checkpoint (vocabulary from the JSON beside it)."""
    from .tokenizer import WorldTokenizer

    meta_path = (checkpoint or CHECKPOINT).with_suffix(".json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return WorldTokenizer(meta["vocab"], meta["vocab_size"], meta["context_length"])
    return WorldTokenizer(vocabulary(), 128, 20)


def lexicon_dir() -> Path:
    """The world's lexicon folder (``lexicons/toyworld``): shape and background nouns, colour/pattern/size adjectives."""
    from .._paths import data_root

    return data_root("lexicons") / LEXICON_NAME


def write_lexicon(folder: str | Path) -> None:
    """Write the world's words by part of speech, in the format of ``lexicons/``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "noun.shape": SHAPES,
        "noun.background": ("background", "gradient", "noise", "backdrop", "wall"),
        "adj.colour": tuple(COLOURS) + ("gray",),
        "adj.pattern": ("striped", "dotted", "solid", "plain", "noisy", "empty"),
        "adj.size": SIZES,
    }
    for name, words in files.items():
        (folder / f"{name}.txt").write_text(f"# toy world {name}\n" + "\n".join(words) + "\n")


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
    """Every detector, configured for the world (NegLabel/CSP mine from the world's lexicon)."""
    lex = str(lexicon_dir())
    no_shapes = [str(p) for p in sorted(lexicon_dir().glob("*.txt")) if p.name != "noun.shape.txt"]
    common = {"lexicon": lex, "ratio": 0.5, "ngroups": 1}
    return {
        "mcm": "mcm", "glmcm": "glmcm", "energy": "energy", "maxlogit": "maxlogit",
        "neglabel": {"method": "neglabel", **common},
        "neglabel (no shape nouns)": {"method": "neglabel", **common, "lexicon": no_shapes},
        "csp": {"method": "csp", **common},
    }


__all__ = ["ARCH", "BACKGROUNDS", "CHECKPOINT", "COLOURS", "FILLS", "ID_SHAPES", "OOD_SHAPES", "SHAPES", "SIZES",
           "Scene", "World", "benchmark", "demo_detectors", "lexicon_dir", "load_images", "tokenizer_for",
           "vocabulary", "write_lexicon"]
