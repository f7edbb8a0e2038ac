"""The CLIPN model: a CLIP that can also say "no" (Wang et al., "CLIPN for Zero-Shot OOD Detection: Teaching CLIP
to Say No", ICCV 2023; reference code xmed-lab/CLIPN, ``src/open_clip/model.py``).

CLIPN keeps a pretrained CLIP (image tower and "yes" text tower, frozen) and adds a "no" text tower, a copy of the
yes tower made at the start of training, plus ``K = 16`` learnable "no" prompts ``P_k`` ``[L, W]`` (zeros at the
start) that are *added* to the token and positional embeddings of the no tower::

    u(text, k) = proj_no( ln_final_no( transformer_no( token_embedding_no(text) + positional_embedding_no + P_k ) )[eot] )

In training each caption uses one of the ``K`` prompts or their mean (``K + 1`` choices, uniform); at inference the
mean prompt ``mean_k P_k``. ``u`` is the feature of "this is *not* <text>". Trainable: the no tower and the prompts
(every parameter whose reference name contains ``_no``); image tower, yes tower and logit scale stay frozen.

vlmood wraps any open_clip encoder with a causal text tower (:func:`vlmood.load_encoder`) instead of forking
open_clip. The no tower runs through the same exact length-trimmed forward as prompt learning
(:func:`vlmood.encoders.text_forward.encode_text_embeddings`): the prompts are added per position, so with causal
attention the first ``max(eot) + 1`` positions give exactly the full-context result.

Files: :meth:`CLIPNModel.save` writes one safetensors file holding only the no side (the reference's key names:
``transformer_no.*``, ``token_embedding_no.weight``, ``positional_embedding_no``, ``ln_final_no.*``,
``text_projection_no``, ``prompt_no``) and the metadata ``format = "vlmood.clipn"``, ``version``, ``meta`` (JSON: base
encoder spec and fingerprint, number of prompts, training hyper-parameters and log summary).
:meth:`CLIPNModel.load` reads those files and the reference's released checkpoints (a torch file with the whole
model, base CLIP keys plus the ``_no`` keys, optionally under ``state_dict`` and ``module.``).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .._io import printable
from ..encoders.base import hash_state_dict
from ..encoders.registry import portable_spec  # noqa: F401  (its home before; importable here still)
from ..encoders.open_clip_backend import CLIPN_NO_KEYS, is_clipn_no_key
from ..encoders.text_forward import (encode_text_embeddings, eot_positions, require_prompt_learning,
                                     text_tower)
from ..errors import CheckpointMismatchError, InvalidInputError

if TYPE_CHECKING:
    from ..encoders.base import Encoder

FORMAT = "vlmood.clipn"
VERSION = "1"
NUM_NO_PROMPTS = 16
"""Learnable "no" prompts in the reference (``num_no_texts``)."""
MEAN_PROMPT = -1
"""Prompt index meaning "the mean of the prompts" (inference), in :meth:`CLIPNModel.encode_no_tokens`."""
NO_KEYS = CLIPN_NO_KEYS
"""Prefixes of the no side's parameter names (the reference's)."""
is_no_key = is_clipn_no_key


class NoTower(torch.nn.Module):
    """CLIPN's "no" text tower and prompts, with the reference's parameter names.

    Built by copying an open_clip text tower (``tower``: the object of
    :func:`vlmood.encoders.text_forward.text_tower`); parameters are float32 whatever the tower's dtype.
    ``prompt_no`` is ``[K, L, W]`` (context length ``L``, width ``W``), zeros at the start.
    """

    def __init__(self, tower: Any, n_prompts: int = NUM_NO_PROMPTS):
        super().__init__()
        if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
            raise InvalidInputError(f"n_prompts must be a positive integer, got {n_prompts!r}")
        self.transformer_no = copy.deepcopy(tower.transformer).float()
        self.token_embedding_no = copy.deepcopy(tower.token_embedding).float()
        self.positional_embedding_no = torch.nn.Parameter(tower.positional_embedding.detach().clone().float())
        self.ln_final_no = copy.deepcopy(tower.ln_final).float()
        proj = tower.text_projection
        if isinstance(proj, torch.nn.Module):
            self.text_projection_no = copy.deepcopy(proj).float()
        elif proj is None:
            self.text_projection_no = None
        else:
            self.text_projection_no = torch.nn.Parameter(proj.detach().clone().float())
        ctx, width = self.positional_embedding_no.shape
        self.prompt_no = torch.nn.Parameter(torch.zeros(n_prompts, ctx, width, device=self.positional_embedding_no.device))
        self.register_buffer("attn_mask", tower.attn_mask.detach().clone(), persistent=False)
        self.requires_grad_(True)

    @property
    def n_prompts(self) -> int:
        return int(self.prompt_no.shape[0])

    def as_tower(self) -> SimpleNamespace:
        """The no tower under the names the text forward reads (``transformer``, ``token_embedding``, ...)."""
        return SimpleNamespace(transformer=self.transformer_no, token_embedding=self.token_embedding_no,
                               positional_embedding=self.positional_embedding_no, ln_final=self.ln_final_no,
                               text_projection=self.text_projection_no, attn_mask=self.attn_mask)

    def prompt_table(self) -> torch.Tensor:
        """``[K + 1, L, W]``: the ``K`` prompts, then their mean (index ``K``, also :data:`MEAN_PROMPT`)."""
        return torch.cat([self.prompt_no, self.prompt_no.mean(dim=0, keepdim=True)], dim=0)


class CLIPNModel:
    """A frozen open_clip encoder plus CLIPN's trainable no side (:class:`NoTower`).

    Args:
        encoder: the base CLIP (an open_clip encoder with a causal text tower).
        no: its no side; None copies the encoder's text tower (an untrained CLIPN, the start of training).
        n_prompts: number of learnable no prompts when ``no`` is None (reference: 16).
        meta: provenance (training hyper-parameters, log summary), JSON-serialisable.
    """

    def __init__(self, encoder: "Encoder", no: NoTower | None = None, n_prompts: int = NUM_NO_PROMPTS,
                 meta: dict[str, Any] | None = None):
        require_prompt_learning(encoder)
        tower = text_tower(encoder)
        self.encoder = encoder
        self.no = NoTower(tower, n_prompts) if no is None else no
        own = NoTower(tower, 1) if no is not None else None
        if own is not None:  # a given no side must have the encoder's text shapes
            theirs = {k: tuple(v.shape) for k, v in self.no.state_dict().items() if k != "prompt_no"}
            mine = {k: tuple(v.shape) for k, v in own.state_dict().items() if k != "prompt_no"}
            if theirs != mine or tuple(self.no.prompt_no.shape[1:]) != tuple(own.prompt_no.shape[1:]):
                raise CheckpointMismatchError(f"the CLIPN no side does not fit the text tower of {encoder.spec}")
        self.no.to(encoder.device)
        self.meta: dict[str, Any] = dict(meta or {})
        self._fingerprint: str | None = None
        self._fingerprint_stamp: tuple = ()

    def __repr__(self) -> str:
        return f"<CLIPNModel on {self.encoder.spec}: {self.no.n_prompts} no prompts>"

    # ------------------------------------------------------------------ identity
    @property
    def fingerprint(self) -> str:
        """``clipn-no:<hash of the no side>|<base encoder fingerprint>``: keys the no side's cached text embeddings.

        The hash is recomputed whenever a tensor of the no side was replaced or changed in place since it was taken
        (each tensor's version counter and storage are compared), or after :meth:`invalidate`."""
        stamp = self._stamp()
        if self._fingerprint is None or stamp != self._fingerprint_stamp:
            self._fingerprint = f"clipn-no:{hash_state_dict(self.no.state_dict())}|{self.encoder.fingerprint}"
            self._fingerprint_stamp = stamp
        return self._fingerprint

    def _stamp(self) -> tuple:
        """What changes when a no-side tensor is modified in place or replaced: versions, storages, shapes."""
        return tuple((k, t._version, t.data_ptr(), tuple(t.shape)) for k, t in self.no.state_dict(keep_vars=True).items())

    def invalidate(self) -> None:
        """Forget the cached fingerprint (e.g. after writing into the weights through ``.data``, which in-place
        version counters do not see)."""
        self._fingerprint = None

    # ------------------------------------------------------------------ no-side text forward
    def encode_no_embeddings(self, embeds: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Unnormalised no-side features ``[M, D]`` of input embeddings ``[M, L', W]`` that already hold the token
        embeddings plus prompts (the positional embedding is added by the forward), trimmed to ``max(eot) + 1``."""
        return encode_text_embeddings(self.encoder, embeds, eot, tower=self.no.as_tower())

    def encode_no_tokens(self, tokens: torch.Tensor, prompt: int | torch.Tensor = MEAN_PROMPT,
                         eot: torch.Tensor | None = None) -> torch.Tensor:
        """Unnormalised no-side features ``[M, D]`` of token ids ``[M, L]`` (differentiable w.r.t. the no side).

        ``prompt``: :data:`MEAN_PROMPT` (inference), a prompt index in ``[0, K]`` (``K`` = the mean), or ``[M]``
        indices, one per text (training). Only the first ``max(eot) + 1`` positions run (exact, see the module
        docstring); ``eot`` defaults to the positions given by the tower's pooling rule.
        """
        if eot is None:
            eot = eot_positions(self.encoder, tokens)
        n = int(eot.max()) + 1 if len(eot) else 1
        dev = self.encoder.device
        table = self.no.prompt_table()
        idx = torch.as_tensor(prompt, dtype=torch.long)  # checked where it is (the trainer's: on the CPU, no sync)
        k = self.no.n_prompts
        if idx.ndim == 0:
            idx = torch.full((tokens.shape[0],), k if int(idx) == MEAN_PROMPT else int(idx), dtype=torch.long)
        if idx.shape != (tokens.shape[0],) or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) > k)):
            raise InvalidInputError(f"prompt must be -1 (mean), an index in [0, {k}] or one such index per text")
        tok = tokens[:, :n].to(dev, non_blocking=True)
        x = self.no.token_embedding_no(tok).float() + table[idx.to(dev, non_blocking=True), :n]
        return self.encode_no_embeddings(x, eot.to(dev))

    def no_text_encoder(self) -> "NoTextEncoder":
        """The no side as a text encoder for :mod:`vlmood.text.embed` (cached, batched, trimmed class embeddings
        with the mean prompt)."""
        return NoTextEncoder(self)

    def text_features_no(self, texts: Sequence[str], cache: Any = True) -> torch.Tensor:
        """``[M, D]`` L2-normalised no-side features of ``texts`` with the mean prompt (float32, CPU)."""
        from ..text.embed import embed_texts

        return embed_texts(self.no_text_encoder(), texts, cache=cache)

    # ------------------------------------------------------------------ files
    def state_dict_no(self) -> dict[str, torch.Tensor]:
        """The no side's tensors under the reference's names (float32, CPU, contiguous)."""
        return {k: v.detach().float().cpu().contiguous() for k, v in self.no.state_dict().items()}

    def save(self, path: str | os.PathLike, encoder_spec: str | None = None) -> Path:
        """Write the no side and metadata to ``path`` (safetensors; a temporary file, then renamed).

        ``encoder_spec``: the spec to record for the base encoder, when ``str(encoder.spec)`` is not how others
        should load it (e.g. ``"toyworld"`` rather than the absolute path of the installed weights).
        """
        from safetensors import SafetensorError

        from .._io import save_safetensors

        path = Path(path)
        if not path.parent.is_dir():
            raise InvalidInputError(f"cannot write {printable(str(path))}: its folder does not exist")
        meta = {"encoder": {"spec": encoder_spec or portable_spec(self.encoder), "fingerprint": self.encoder.fingerprint},
                "n_prompts": self.no.n_prompts, **{k: v for k, v in self.meta.items() if k != "encoder"}}
        try:
            save_safetensors(self.state_dict_no(), path,
                             metadata={"format": FORMAT, "version": VERSION, "meta": json.dumps(meta)})
        except (OSError, SafetensorError) as e:
            why = getattr(e, "strerror", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InvalidInputError(f"cannot write {printable(str(path))}: {why}") from e
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: "Encoder | None" = None, arch: str = "ViT-B-16",
             device: str | torch.device | None = None, precision: str | None = None) -> "CLIPNModel":
        """Read a CLIPN file: one saved by :meth:`save`, or a reference checkpoint (base CLIP + ``_no`` keys).

        ``encoder``: the base CLIP; None loads it from the file (a vlmood file records its spec; a reference
        checkpoint holds the base weights for the open_clip architecture ``arch``, the reference's ViT-B-16 by
        default). A given encoder must be the one the file was trained on: another one is refused, naming both
        fingerprints. Missing or unexpected keys and wrong shapes are refused, naming them.
        """
        path = Path(os.path.expanduser(os.fspath(path)))
        if not path.is_file():
            raise InvalidInputError(f"CLIPN file not found: {printable(str(path))}")
        meta = _vlmood_meta(path)
        if meta is not None:
            return cls._load_vlmood(path, meta, encoder, device, precision)
        return cls._load_reference(path, encoder, arch, device, precision)

    @classmethod
    def _load_vlmood(cls, path: Path, meta: dict[str, Any], encoder: "Encoder | None", device: Any,
                     precision: str | None) -> "CLIPNModel":
        from safetensors.torch import load_file

        base = meta.get("encoder", {})
        if encoder is None:
            from ..encoders import load_encoder

            encoder = load_encoder(base.get("spec", ""), device=device, precision=precision)
        if base.get("fingerprint") and base["fingerprint"] != encoder.fingerprint:
            raise CheckpointMismatchError(
                f"{printable(str(path))} was trained on {base.get('spec')} (fingerprint {base['fingerprint']}) but the "
                f"encoder given is {encoder.spec} (fingerprint {encoder.fingerprint}); load it with that encoder")
        sd = load_file(str(path))
        return cls._from_no_state(encoder, sd, str(path), {k: v for k, v in meta.items() if k != "encoder"})

    @classmethod
    def _load_reference(cls, path: Path, encoder: "Encoder | None", arch: str, device: Any,
                        precision: str | None) -> "CLIPNModel":
        from ..encoders.open_clip_backend import read_state_dict

        sd = read_state_dict(path)
        no = {k: v for k, v in sd.items() if is_no_key(k)}
        if "prompt_no" not in no:
            raise CheckpointMismatchError(f"{printable(str(path))} is not a CLIPN checkpoint: it has no 'prompt_no' "
                                          "(expected the reference's keys transformer_no.*, token_embedding_no.weight, "
                                          "positional_embedding_no, ln_final_no.*, text_projection_no, prompt_no)")
        if encoder is None:
            from ..encoders import load_encoder

            encoder = load_encoder(f"open_clip:{arch}@{path}", device=device, precision=precision)
        else:
            base = {k: v for k, v in sd.items() if not is_no_key(k)}
            own = encoder.model.state_dict()
            same = set(own) == set(base) and all(
                own[k].shape == base[k].shape and torch.equal(own[k].detach().cpu(), base[k].to(own[k].dtype))
                for k in own)
            if not base:  # only the no side, without vlmood's record of its base: nothing to check it against
                raise CheckpointMismatchError(
                    f"{printable(str(path))} holds only CLIPN's no side and no record of the base CLIP it was trained "
                    f"on, so it cannot be checked against {encoder.spec}; use the full reference checkpoint or a file "
                    "written by CLIPNModel.save (which records the base encoder)")
            elif not same:
                theirs = f"{encoder.spec.backend}:{arch}:{hash_state_dict(base)}"
                raise CheckpointMismatchError(
                    f"{printable(str(path))} holds another base CLIP (fingerprint {theirs}) than the encoder given, "
                    f"{encoder.spec} (fingerprint {encoder.fingerprint}); pass encoder=None to load its own")
        return cls._from_no_state(encoder, no, str(path), {"imported_from": printable(str(path))})

    @classmethod
    def _from_no_state(cls, encoder: "Encoder", sd: dict[str, torch.Tensor], source: str,
                       meta: dict[str, Any]) -> "CLIPNModel":
        from ..encoders.open_clip_backend import load_matching_state_dict

        require_prompt_learning(encoder)
        prompts = sd.get("prompt_no")
        if not isinstance(prompts, torch.Tensor) or prompts.ndim != 3:
            raise CheckpointMismatchError(f"{printable(source)} has no prompt_no tensor [K, L, W]")
        no = NoTower(text_tower(encoder), int(prompts.shape[0]))
        load_matching_state_dict(no, {k: v.float() for k, v in sd.items()}, printable(source),
                                 f"CLIPN no side of {encoder.spec}")
        return cls(encoder, no, meta=meta)



def _vlmood_meta(path: Path) -> dict[str, Any] | None:
    """The ``meta`` of a vlmood CLIPN file, or None for another file (a reference checkpoint)."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise InvalidInputError(f"cannot read {printable(str(path))}: {type(e).__name__}: {e}") from e
    if header.get("format") != FORMAT:
        return None
    if header.get("version") != VERSION:
        raise InvalidInputError(f"{printable(str(path))} is a CLIPN file of version {header.get('version')!r}; this "
                                f"vlmood reads version {VERSION}")
    try:
        meta = json.loads(header.get("meta", "{}"))
    except ValueError as e:
        raise InvalidInputError(f"{printable(str(path))} has malformed metadata: {e}") from e
    return meta if isinstance(meta, dict) else {}


class NoTextEncoder:
    """CLIPN's no side (mean prompt) behind the part of the :class:`~vlmood.encoders.Encoder` interface that the
    text-embedding engine (:func:`vlmood.text.embed.embed_texts`) uses: tokenizer, batching, trimming and the disk
    cache, keyed by :attr:`CLIPNModel.fingerprint`."""

    def __init__(self, model: CLIPNModel):
        self.model = model
        enc = model.encoder
        self.spec = f"CLIPN no side of {enc.spec}"
        self.device, self.precision = enc.device, enc.precision
        self.cache_precision = enc.precision  # the no tower is a float32 copy run under autocast, as before
        self.embed_dim, self.text_batch_size = enc.embed_dim, enc.text_batch_size
        self.exact_text_trimming = True

    @property
    def fingerprint(self) -> str:
        return self.model.fingerprint

    def autocast(self) -> Any:
        return self.model.encoder.autocast()

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        return self.model.encoder.tokenize(texts)

    def _encode_token_batch(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        with torch.no_grad():
            return self.model.encode_no_tokens(tokens, MEAN_PROMPT)

    def describe(self) -> str:
        return self.spec
