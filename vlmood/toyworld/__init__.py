"""The toy vision-language world: a procedural image generator, its lexicon, a tiny CLIP trained on it
(shipped in ``assets/``), zero-shot OOD benchmarks in the world, and the demo.

``vlmood.load_encoder("toyworld")`` loads the shipped model through the ordinary open_clip path: :mod:`.model`
registers it with :mod:`vlmood.encoders.registry`. The benchmark (:mod:`.bench`) imports the evaluation side only
inside its functions, so the encoders' import path never includes it (``tests/test_layout.py``).
"""
from __future__ import annotations

from pathlib import Path

from .bench import benchmark, demo, demo_descriptions, demo_detectors, load_images
from .model import ARCH, ASSETS, CHECKPOINT, tokenizer_for
from .world import BACKGROUNDS, COLOURS, FILLS, ID_SHAPES, OOD_SHAPES, SHAPES, SIZES, Scene, World, vocabulary

LEXICON_NAME = "toyworld"


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
        (folder / f"{name}.txt").write_text(f"# toy world {name}\n" + "\n".join(words) + "\n", encoding="utf-8")


__all__ = ["ARCH", "ASSETS", "BACKGROUNDS", "CHECKPOINT", "COLOURS", "FILLS", "ID_SHAPES", "OOD_SHAPES", "SHAPES", "SIZES",
           "Scene", "World", "benchmark", "demo", "demo_descriptions", "demo_detectors", "lexicon_dir", "load_images",
           "tokenizer_for", "vocabulary", "write_lexicon"]
