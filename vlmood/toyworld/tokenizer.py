"""A word-level tokenizer for the toy world, shaped like open_clip's so the same text engine applies.

Ids: pad 0, start 1, unknown 2, words from 3, and the end-of-text token at the highest id, so argmax
pooling finds it and length-trimmed batches stay exact.
"""
from __future__ import annotations

import re
from typing import Sequence

from .._lazy import torch

_WORD = re.compile(r"[a-z]+")


class WorldTokenizer:
    pad_token_id, sot_token_id, unk_token_id = 0, 1, 2
    word_level = True  # words outside the vocabulary become unk_token_id (detectors warn about such class names)

    def __init__(self, vocab: Sequence[str], vocab_size: int, context_length: int = 20):
        if len(vocab) + 4 > vocab_size:
            raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size} ids")
        self.vocab = list(vocab)
        self.index = {w: i + 3 for i, w in enumerate(self.vocab)}
        self.vocab_size = vocab_size
        self.eot_token_id = vocab_size - 1
        self.context_length = context_length

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` (lower-cased; anything but letters separates words), without start/end tokens."""
        return [self.index.get(w, self.unk_token_id) for w in _WORD.findall(text.lower())]

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        out = torch.zeros(len(texts), ctx, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(t) + [self.eot_token_id]
            if len(ids) > ctx:
                ids = ids[:ctx]
                ids[-1] = self.eot_token_id
            out[i, : len(ids)] = torch.tensor(ids)
        return out
