"""Named models and architecture tokenizers, owned by the encoders; the packages that provide models register them.

- :func:`register_model` makes a short name (``toyworld``) a model spec: ``load_encoder("toyworld")``.
- :func:`register_tokenizer` gives an open_clip architecture its own tokenizer (the toy world's word-level one),
  used whichever spec names that architecture (``toyworld`` or ``open_clip:vlmood-toyworld@FILE``).

Built-in providers are listed below by *module path* and imported only when one of their names is first looked
up, so the encoders never import the packages that provide models (and a fresh process that imported only
:mod:`vlmood.encoders` still resolves them). A provider module must register on import and must not import
the benchmark side (``vlmood.evaluation``, ``vlmood.detectors``); ``tests/test_layout.py`` checks both.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import InvalidInputError

if TYPE_CHECKING:
    from .base import Encoder, EncoderSpec

SpecResolver = Callable[[], "EncoderSpec"]
TokenizerFactory = Callable[["EncoderSpec"], Any]

BUILTIN_MODELS: dict[str, str] = {"toyworld": "vlmood.toyworld.model"}
"""Model name -> module that registers it when imported."""
BUILTIN_TOKENIZERS: dict[str, str] = {"vlmood-toyworld": "vlmood.toyworld.model"}
"""open_clip architecture -> module that registers its tokenizer when imported."""

_models: dict[str, SpecResolver] = {}
_tokenizers: dict[str, TokenizerFactory] = {}


def _register(table: dict[str, Any], kind: str, key: str, value: Any, replace: bool, if_absent: bool = False) -> None:
    """Add ``key``; a different value under a name already taken is refused unless ``replace`` (a later
    registration never silently replaces an earlier one). ``if_absent``: keep what is there (built-in providers
    use it, so a user's explicit registration of the same name stands)."""
    old = table.get(key)
    if old is not None and if_absent:
        return
    if old is not None and old is not value and not replace:
        raise InvalidInputError(f"{kind} {key!r} is already registered (by {getattr(old, '__module__', '?')}); "
                                "pass replace=True to replace it")
    table[key] = value


def register_model(name: str, resolver: SpecResolver, replace: bool = False, if_absent: bool = False) -> None:
    """Make ``name`` a model spec; ``resolver()`` returns its :class:`~vlmood.encoders.EncoderSpec`.

    Names cannot contain ``:`` (that would read as a backend prefix such as ``open_clip:``). A name already
    registered with another resolver is refused unless ``replace=True``.
    """
    if not isinstance(name, str) or not name.strip() or ":" in name or name != name.strip():
        raise InvalidInputError(f"invalid model name {name!r}: a non-empty word without ':' or surrounding spaces")
    _register(_models, "model name", name, resolver, replace, if_absent)


def register_tokenizer(arch: str, factory: TokenizerFactory, replace: bool = False, if_absent: bool = False) -> None:
    """Use ``factory(spec)`` as the tokenizer of every open_clip model of architecture ``arch``; an architecture
    that already has another tokenizer is refused unless ``replace=True``."""
    _register(_tokenizers, "tokenizer for architecture", arch, factory, replace, if_absent)


def _provide(table: dict[str, str], key: str) -> None:
    module = table.get(key)
    if module is not None:
        importlib.import_module(module)


def resolve_model(name: str) -> "EncoderSpec | None":
    """The spec of a registered model name, or None when ``name`` is not one."""
    if name not in _models:
        _provide(BUILTIN_MODELS, name)
    resolver = _models.get(name)
    return None if resolver is None else resolver()


def tokenizer_factory(arch: str) -> TokenizerFactory | None:
    """The registered tokenizer factory of an open_clip architecture, or None (use open_clip's own)."""
    if arch not in _tokenizers:
        _provide(BUILTIN_TOKENIZERS, arch)
    return _tokenizers.get(arch)


def model_names() -> list[str]:
    """Every model name that :func:`resolve_model` knows (built-in and registered), sorted."""
    return sorted(set(_models) | set(BUILTIN_MODELS))


def portable_spec(encoder: "Encoder") -> str:
    """How a file should record ``encoder`` so that it loads elsewhere: the name of a registered model whose spec is
    the encoder's (``toyworld`` rather than the absolute path of the installed weights), else the spec with an
    absolute checkpoint path (a relative one would depend on the working folder)."""
    spec = encoder.spec
    for name in model_names():
        try:
            if resolve_model(name) == spec:
                return name
        except Exception:  # a user's resolver failing is not this file's problem
            continue
    if getattr(spec, "checkpoint", None) is not None and not Path(spec.checkpoint).is_absolute():
        return str(type(spec)(spec.backend, spec.name, spec.pretrained, Path(spec.checkpoint).resolve(), spec.seed))
    if spec.backend == "hf" and not Path(spec.name).is_absolute() and Path(spec.name).is_dir():  # a local folder
        return str(type(spec)(spec.backend, str(Path(spec.name).resolve()), spec.pretrained, spec.checkpoint,
                              spec.seed))
    return str(spec)
