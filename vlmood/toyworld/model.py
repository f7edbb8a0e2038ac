"""The toy world's shipped tiny CLIP: where its weights live, its word-level tokenizer, and its registration as
the named model ``toyworld`` (``vlmood.load_encoder("toyworld")``).

:mod:`vlmood.encoders.registry` imports this module lazily, by path, the first time ``toyworld`` or the
``vlmood-toyworld`` architecture is looked up; it imports nothing from the benchmark side (evaluation, detectors).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..encoders.base import EncoderSpec
from ..encoders.registry import register_model, register_tokenizer
from .tokenizer import WorldTokenizer
from .world import vocabulary

ASSETS = Path(__file__).resolve().parent / "assets"
CHECKPOINT = ASSETS / "toyworld.safetensors"
CLIPN_CHECKPOINT = ASSETS / "toyworld-clipn.safetensors"
"""CLIPN's "no" side trained on the toy world's captions from the shipped CLIP (``python -m vlmood.toyworld.clipn``)."""
ARCH = "vlmood-toyworld"
NAME = "toyworld"


def tokenizer_for(checkpoint: Path | None = None) -> WorldTokenizer:
    """The word-level tokenizer of a toy-world checkpoint (vocabulary from the JSON beside it)."""
    meta_path = Path(checkpoint or CHECKPOINT).with_suffix(".json")
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return WorldTokenizer(meta["vocab"], meta["vocab_size"], meta["context_length"])
    return WorldTokenizer(vocabulary(), 128, 20)


def spec() -> EncoderSpec:
    """The spec of the shipped model: ``open_clip:vlmood-toyworld@<assets>/toyworld.safetensors``."""
    return EncoderSpec("open_clip", ARCH, checkpoint=CHECKPOINT)


register_model(NAME, spec, if_absent=True)  # a user's own registration of the name stands
register_tokenizer(ARCH, lambda s: tokenizer_for(s.checkpoint), if_absent=True)
