"""In-process LVLM client: a transformers image-text-to-text model (Qwen2-VL, LLaVA, InternVL, Idefics, SmolVLM...).

The model is loaded with ``AutoProcessor`` + ``AutoModelForImageTextToText`` from a local folder or a hub id (from
the local Hugging Face cache when ``HF_HUB_OFFLINE=1``), or given as built objects. Each request is rendered with
the processor's chat template (one user turn: the image part, then the text part), requests are generated in
batches with left padding (greedy at temperature 0, so a batched answer equals the unbatched one), on CUDA when
present, and only the new tokens are decoded. Replies are read from / written to the
:class:`~vlmood.lvlm.cache.ResponseCache` keyed by :attr:`TransformersClient.model_id`.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

from .._io import printable
from ..errors import EncoderLoadError, InvalidInputError
from .base import GenerationParams, LVLMClient, Messages, Reply, Request

_SAMPLE = 256  # weight values hashed per tensor for the fingerprint of the model's weights


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return printable(text if len(text) <= 300 else text[:297] + "...")


def weights_fingerprint(model: Any, extra: str = "") -> str:
    """A 16-hex fingerprint of a torch model's weights: every state-dict entry's name, dtype and shape plus up to
    256 evenly strided values of it (cheap even for billions of parameters; a fine-tuned or re-initialised model
    differs in the sampled values), and ``extra`` (e.g. the chat template)."""
    h = hashlib.sha256(extra.encode("utf-8", "surrogatepass"))
    import torch

    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
            continue
        try:
            flat = t.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE]
            h.update(sample.to("cpu", torch.float64).numpy().tobytes())
        except (RuntimeError, TypeError, ValueError):  # quantised / exotic tensor subclasses: name and shape only
            pass
    return h.hexdigest()[:16]


def _is_local(name: str) -> bool:
    """Whether ``name`` is meant as a folder (absolute, ``./``, ``~``, or more than one ``/``) rather than a hub id."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep
            in name or Path(name).expanduser().exists())


def _to_chat(prompt: Messages, has_image: bool) -> list[dict[str, Any]]:
    """The chat messages in the processor's format: text parts ``{"type": "text", "text": ...}``; the image part
    ``{"type": "image"}`` first in the last user turn. Raises ``ValueError`` for malformed messages."""
    if isinstance(prompt, str):
        messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt:
        messages = list(prompt)
    else:
        raise ValueError(f"a prompt must be a string or a non-empty list of chat messages, not {prompt!r:.60}")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"chat message {i} is not a {{'role': ..., 'content': ...}} dict")
        content = m["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for p in content:
                if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                    parts.append({"type": "text", "text": p["text"]})
                else:
                    kind = repr(p.get("type"))[:40] if isinstance(p, dict) else type(p).__name__
                    raise ValueError(f"chat message {i} has a {kind} part: only text parts are accepted (the image "
                                     "goes in Request.image)")
        else:
            raise ValueError(f"chat message {i} content is a {type(content).__name__}, not text")
        out.append({"role": m["role"], "content": parts})
    if has_image:
        users = [i for i, m in enumerate(out) if m["role"] == "user"]
        if not users:
            raise ValueError("the chat messages have no user turn to attach the image to")
        out[users[-1]]["content"].insert(0, {"type": "image"})
    return out


def _load_pil(image: Any) -> Any:
    """``image`` (PIL image, path or encoded bytes) decoded as RGB; raises ``ImageLoadError`` (one line)."""
    from ..data import _open_bytes, load_image

    if isinstance(image, (bytes, bytearray, memoryview)):
        return load_image(_open_bytes(bytes(image), "given as bytes"))
    return load_image(image)


class TransformersClient(LVLMClient):
    """An in-process transformers vision-language chat model as an :class:`~vlmood.lvlm.base.LVLMClient`.

    Args:
        model: a local folder or hub id (loaded with ``AutoProcessor`` + ``AutoModelForImageTextToText``; a hub id
            comes from the local Hugging Face cache when offline), or a built model (then ``processor`` is needed).
        processor: the model's processor (tokenizer + image processor + chat template) for a built model.
        device: ``"cuda"``, ``"cpu"``, ... (default: CUDA when available; a built model given without ``device``
            stays where it is).
        batch_size: requests generated together (left-padded).
        max_new_tokens: default answer length (``max_tokens=`` per call overrides it).
        temperature: default temperature; 0 = greedy (deterministic).
        cache: use the response cache (True: ``$VLMOOD_CACHE/lvlm``; or a :class:`ResponseCache`; False: none).

    ``model_id`` is ``"hf:<name_or_path>@<fingerprint>"``, the fingerprint covering the weights and the chat
    template (see :func:`weights_fingerprint`), so a changed model never reads another model's cached replies.
    """

    def __init__(self, model: Any, processor: Any = None, device: Any = None, batch_size: int = 8,
                 max_new_tokens: int = 256, temperature: float = 0.0, cache: Any = True):
        from ..encoders.base import resolve_device

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.params = self._params(temperature, max_new_tokens, {})
        if isinstance(model, (str, os.PathLike)):
            model, processor = self._load(os.fsdecode(model), processor, device)
            dev = resolve_device(device)
        else:
            if processor is None:
                raise InvalidInputError(f"a built model ({type(model).__name__}) needs its processor: "
                                        "TransformersClient(model, processor=...)")
            if not callable(getattr(model, "generate", None)):
                raise InvalidInputError(f"{type(model).__name__} is not a generative model (it has no .generate)")
            dev = resolve_device(device) if device is not None else None
        self.model, self.processor = model, processor
        name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
                   or type(model).__name__)
        template = getattr(processor, "chat_template", None)
        if not template:
            raise InvalidInputError(f"the processor of {printable(name)} has no chat template: pass a processor "
                                    "with chat_template set (or save one as chat_template.jinja in the model folder)")
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise InvalidInputError(f"the processor of {printable(name)} ({type(processor).__name__}) has no "
                                    "tokenizer")
        self.tokenizer.padding_side = "left"  # generation continues every row at the same position
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if dev is not None and not getattr(model, "hf_device_map", None):
            model.to(dev)
        model.eval()
        self.device = next((p.device for p in model.parameters()), dev)
        self.model_id = f"hf:{name}@{weights_fingerprint(model, str(template))}"
        if cache is True:
            from .cache import ResponseCache

            cache = ResponseCache()
        self.cache = None if cache is None or cache is False else cache  # (an empty cache is falsy)

    def __repr__(self) -> str:
        return f"TransformersClient({self.model_id!r}, device={str(self.device)!r}, batch_size={self.batch_size})"

    @staticmethod
    def _load(name: str, processor: Any, device: Any) -> tuple[Any, Any]:
        """Model and processor from a folder or hub id; one-line errors for a missing folder or a failed load."""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from ..encoders.base import resolve_device

        if not name.strip():
            raise InvalidInputError("empty LVLM model path / hub id")
        local = _is_local(name)
        path = Path(name).expanduser()
        if local and not path.is_dir():
            what = "is a file, not a model folder" if path.exists() else "not found"
            raise InvalidInputError(f"LVLM model folder {what}: {printable(name)}")
        src = str(path) if local else name
        dev = resolve_device(device)
        kw: dict[str, Any] = {"local_files_only": True} if local else {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if processor is None:
                    processor = AutoProcessor.from_pretrained(src, **kw)
                model = AutoModelForImageTextToText.from_pretrained(
                    src, dtype="auto" if dev.type == "cuda" else torch.float32, **kw)
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, KeyError...: all mean "could not load"
            hint = ("" if local else "; offline (HF_HUB_OFFLINE=1) a hub id must be in the local Hugging Face cache"
                    " (HF_HOME), or pass a local model folder")
            raise EncoderLoadError(f"could not load the LVLM {printable(name)}: {type(e).__name__}: "
                                   f"{_one_line(e)}{hint}") from None
        return model, processor

    def _params(self, temperature: Any, max_tokens: Any, extra: dict[str, Any]) -> GenerationParams:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                math.isfinite(temperature) and temperature >= 0):
            raise InvalidInputError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if extra:
            from transformers import GenerationConfig

            known = GenerationConfig()
            bad = sorted(k for k in extra if k != "seed" and (not hasattr(known, k)
                                                              or k in ("max_new_tokens", "do_sample", "num_return_sequences")))
            seed = extra.get("seed")
            if "seed" in extra and (isinstance(seed, bool) or not isinstance(seed, int)):
                raise InvalidInputError(f"seed must be an integer, got {seed!r}")
            if bad:
                raise InvalidInputError(f"unknown generation parameter(s) for transformers: {', '.join(bad)} "
                                        "(temperature, max_tokens and GenerationConfig fields such as top_p)")
        return GenerationParams(float(temperature), max_tokens, dict(extra))

    def generate_many(self, requests: Sequence[Request], progress: bool | None = None,
                      **params: Any) -> list[Reply]:
        """Replies in request order (see :meth:`LVLMClient.generate_many`). ``params``: ``temperature``,
        ``max_tokens`` (alias ``max_new_tokens``), ``seed`` (seeds sampling) and other ``GenerationConfig`` fields
        (e.g. ``top_p``).

        A request whose prompt is malformed, whose image is unreadable or whose generation fails gets a
        :class:`Reply` with a one-line ``error``; the others go on (a failed batch is retried one by one)."""
        temperature = params.pop("temperature", self.params.temperature)
        max_tokens = params.pop("max_tokens", params.pop("max_new_tokens", self.params.max_tokens))
        gp = self._params(temperature, max_tokens, params)
        replies: list[Reply | None] = [None] * len(requests)
        todo: list[tuple[int, str, Any, str | None]] = []  # (index, rendered text, PIL image or None, cache key)
        for i, req in enumerate(requests):
            if not isinstance(req, Request):
                raise InvalidInputError(f"request {i} is a {type(req).__name__}, not a vlmood.lvlm.Request")
            try:
                key = None
                if self.cache is not None:
                    from .cache import image_hash

                    try:
                        ihash = image_hash(req.image)
                    except OSError:
                        _load_pil(req.image)  # names the problem in one line (missing, a folder, ...)
                        raise
                    key = self.cache.key(self.model_id, req.prompt, ihash, gp.key())
                    hit = self.cache.get_entry(key)
                    if hit is not None:
                        replies[i] = Reply(hit[0], cached=True, attempts=0, truncated=hit[1])
                        continue
                image = _load_pil(req.image) if req.image is not None else None
                text = self.processor.apply_chat_template(_to_chat(req.prompt, image is not None),
                                                          add_generation_prompt=True, tokenize=False)
                todo.append((i, text, image, key))
            except Exception as e:  # noqa: BLE001 - one request's failure is its reply, never the run's
                replies[i] = Reply(None, error=_one_line(e))
        todo.sort(key=lambda t: -len(t[1]))  # similar lengths together: less padding
        from .._progress import progress as _progress

        show = progress if (progress is not None or len(todo) > 1) else False
        with _progress(len(todo), f"generating {self.model_id}", "requests", show,
                       start=f"generating {len(todo):,} answers with {self.model_id}") as bar:
            for s in range(0, len(todo), self.batch_size):
                chunk = todo[s:s + self.batch_size]
                try:
                    outs: list[str | BaseException] = list(self._generate(chunk, gp))
                except Exception:  # noqa: BLE001 - retry one by one, so only the culprit fails
                    outs = []
                    for item in chunk:
                        try:
                            outs.extend(self._generate([item], gp))
                        except Exception as e:  # noqa: BLE001
                            outs.append(e)
                if len(outs) != len(chunk):  # e.g. num_return_sequences: never pair answers with other requests
                    raise InvalidInputError(f"the model returned {len(outs)} answers for {len(chunk)} requests; "
                                            "one answer per request is needed (drop num_return_sequences)")
                for (i, _, _, key), out in zip(chunk, outs):
                    if isinstance(out, BaseException):
                        replies[i] = Reply(None, error=f"generation failed: {type(out).__name__}: {_one_line(out)}",
                                           attempts=1)
                    else:
                        text, cut = out
                        if key is not None:
                            self.cache.put(key, text, cut)
                        replies[i] = Reply(text, attempts=1, truncated=cut)
                bar.update(len(chunk))
        return [r for r in replies if r is not None]

    def _generate(self, chunk: list[tuple[int, str, Any, str | None]],
                  gp: GenerationParams) -> list[tuple[str, bool]]:
        """One batched ``model.generate`` over rendered texts (and their images); the new tokens decoded."""
        import torch

        texts = [t for _, t, _, _ in chunk]
        images = [im for _, _, im, _ in chunk if im is not None]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        if dtype is not None and "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        extra = dict(gp.extra)
        seed = extra.pop("seed", None)  # seeds sampling (a re-ask at temperature > 0); part of the cache key
        kw: dict[str, Any] = {"max_new_tokens": gp.max_tokens, "pad_token_id": self.tokenizer.pad_token_id,
                              **extra}
        if gp.temperature > 0:
            kw.update(do_sample=True, temperature=gp.temperature)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        devices = [self.device] if torch.device(self.device).type == "cuda" else []
        with torch.inference_mode(), warnings.catch_warnings(), torch.random.fork_rng(devices=devices):
            warnings.simplefilter("ignore")  # generation-config chatter (unused sampling fields)
            if seed is not None:  # the caller's RNG is restored afterwards (fork_rng)
                torch.manual_seed(seed)
            out = self.model.generate(**inputs, **kw)
        if not getattr(self.model.config, "is_encoder_decoder", False):
            out = out[:, inputs["input_ids"].shape[1]:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        # cut by the token limit: max_new_tokens generated and no end-of-sequence among them
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = self.tokenizer.pad_token_id
        cut = []
        for row in out.tolist():
            toks = [t for t in row if t != pad] if pad not in eos else row
            cut.append(len(row) >= gp.max_tokens and not (eos & set(toks)))
        return [(t.strip(), c) for t, c in zip(texts, cut)]
