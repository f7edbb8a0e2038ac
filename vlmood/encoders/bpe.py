"""A faster, exact front end for open_clip's CLIP tokenizer (``open_clip.tokenizer.SimpleTokenizer``).

Large text sides (NegLabel's 70,794 lexicon words, CSP's ~420k prompts) spent most of their encoding time in the
pure-Python tokenizer: ``ftfy.fix_text`` on every prompt, a tensor built per prompt, and the byte-to-unicode mapping
redone for every word. :class:`FastCLIPTokenizer` returns the *same token ids* with three shortcuts:

1. *Plain prompts skip ftfy and HTML unescaping.* A prompt made only of printable ASCII (``0x20``-``0x7e``) without
   ``&`` is left unchanged by ``ftfy.fix_text`` (every fix ftfy applies involves a non-ASCII character, a control
   character or an HTML entity) and by ``html.unescape``; its cleaning is then just whitespace collapsing and lower
   case, as in open_clip's ``clean="lower"``. Any other prompt goes through the tokenizer's own cleaning.
2. *Each distinct word is mapped to ids once* (bytes to BPE symbols, BPE merges, vocabulary lookups), with the
   tokenizer's own ``pat`` regex. The merges run in the Rust BPE of Hugging Face ``tokenizers`` (a dependency of
   ``transformers``), built from the tokenizer's own vocabulary and merge ranks. It applies the same rule as CLIP's
   ``bpe`` (repeatedly merge the lowest-ranked adjacent pair, leftmost first) and gives the same symbols whenever every
   merge only uses base symbols or the results of earlier merges, which :func:`_rust_bpe` checks over the whole merge
   list before using it (CLIP's merges pass). Without ``tokenizers``, or for the special tokens, the tokenizer's own
   ``bpe`` is used.
3. *One array for the whole batch*, filled row by row, instead of one tensor per prompt.

Truncation is open_clip's: a prompt longer than the context keeps its first ``context_length`` ids with the last
replaced by the end-of-text id. Only the plain ``clean="lower"`` tokenizer without a reduction mask is wrapped
(:func:`fast_tokenizer`); anything else is returned unchanged. ``tests/test_bpe.py`` compares both on the whole
bundled lexicon under NegLabel's and CSP's templates and on adversarial text.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

_PLAIN = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"&"}


def is_plain(text: str) -> bool:
    """Whether ``text`` is printable ASCII without ``&`` (ftfy and HTML unescaping leave it unchanged)."""
    return text.isascii() and _PLAIN.issuperset(text)


def _rust_bpe(tok: Any) -> Any:
    """A ``tokenizers.models.BPE`` equal to ``tok.bpe`` (see the module doc), or None when it cannot be built or
    the merges are not ordered so that the two agree."""
    try:
        from tokenizers.models import BPE
    except ImportError:  # pragma: no cover - transformers brings tokenizers
        return None
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    base = set(tok.byte_encoder.values())
    known = base | {b + "</w>" for b in base}
    for a, b in merges:  # every merge builds on symbols that exist before it, and makes a vocabulary entry
        if a not in known or b not in known or a + b not in tok.encoder:
            return None
        known.add(a + b)
    try:
        return BPE(vocab=dict(tok.encoder), merges=merges, end_of_word_suffix="</w>", continuing_subword_prefix="",
                   fuse_unk=False, ignore_merges=False)
    except Exception:  # pragma: no cover - an incompatible tokenizers version: keep the tokenizer's own bpe
        return None


class FastCLIPTokenizer:
    """Wraps a ``SimpleTokenizer``; ``__call__`` and ``encode`` give its exact ids, every other attribute is the
    wrapped tokenizer's."""

    def __init__(self, inner: Any):
        self.inner = inner
        self._ids: dict[str, list[int]] = {}
        self._rust: Any = False  # built on first use (None: not available)

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "_ids", "_rust"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __copy__(self) -> "FastCLIPTokenizer":  # a copy's settings are its own, as for a SimpleTokenizer
        import copy

        return FastCLIPTokenizer(copy.copy(self.inner))

    def __deepcopy__(self, memo: dict) -> "FastCLIPTokenizer":
        import copy

        return FastCLIPTokenizer(copy.deepcopy(self.inner, memo))

    def __setattr__(self, name: str, value: Any) -> None:  # e.g. context_length: the wrapped tokenizer's
        if name in ("inner", "_ids", "_rust"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def _word_ids(self, word: str) -> list[int]:
        ids = self._ids.get(word)
        if ids is None:
            tok = self.inner
            sym = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
            if self._rust is False:
                self._rust = _rust_bpe(tok)
            if self._rust is None or sym in tok.cache:  # the special tokens map to themselves
                ids = [tok.encoder[t] for t in tok.bpe(sym).split(" ")]
            else:
                ids = [t.id for t in self._rust.tokenize(sym)]
            self._ids[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start and end tokens (``SimpleTokenizer.encode``)."""
        tok = self.inner
        clean = " ".join(text.split()).lower() if is_plain(text) else tok.clean_fn(text)
        out: list[int] = []
        for word in tok.pat.findall(clean):
            out += self._word_ids(word)
        return out

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``[N, context_length]`` int64 ids, zero-padded, as ``SimpleTokenizer.__call__`` returns them."""
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.inner.context_length
        assert ctx, "Please set a valid context length"
        sot, eot = self.inner.sot_token_id, self.inner.eot_token_id
        out = np.zeros((len(texts), ctx), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [sot, *self.encode(text), eot]
            if len(ids) > ctx:
                ids = ids[:ctx]
                ids[-1] = eot
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)


def fast_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` wrapped in :class:`FastCLIPTokenizer` when it is open_clip's plain ``SimpleTokenizer``
    (``clean="lower"``, no reduction mask); otherwise ``tokenizer`` itself."""
    try:
        from open_clip.tokenizer import SimpleTokenizer, _clean_lower
    except ImportError:  # pragma: no cover - another open_clip layout: keep its tokenizer
        return tokenizer
    if type(tokenizer) is not SimpleTokenizer or getattr(tokenizer, "clean_fn", None) is not _clean_lower \
            or getattr(tokenizer, "reduction_fn", None) is not None:
        return tokenizer
    needed = ("byte_encoder", "encoder", "bpe", "pat", "sot_token_id", "eot_token_id", "context_length")
    return FastCLIPTokenizer(tokenizer) if all(hasattr(tokenizer, n) for n in needed) else tokenizer
