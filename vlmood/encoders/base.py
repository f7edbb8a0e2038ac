"""The backend-independent ``Encoder`` interface, device/precision selection, and spec parsing."""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import sys
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np

from .._lazy import F, torch
from ..errors import InvalidInputError

ImageInput = Union["torch.Tensor", str, "os.PathLike[str]", Any, Sequence[Any]]
"""A preprocessed batch ``[N, 3, H, W]`` (tensor or array); one image path, folder, glob or manifest; one PIL
image; or a sequence of PIL images, paths and folders (see :func:`image_items`)."""


def _is_pil(x: Any) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image)


def image_items(images: Any) -> list[Any]:
    """The PIL images and image paths that ``images`` stands for, in order.

    A single path, folder (every image under it, sorted), glob or CSV manifest is resolved with
    :func:`vlmood.data.list_images`; a single PIL image is one item; a sequence may mix PIL images, paths
    and folders (folders are expanded in place). Anything else raises a one-line :class:`InvalidInputError`.
    """
    from ..data import list_images

    paths = (str, bytes, os.PathLike)
    if _is_pil(images):
        return [images]
    if isinstance(images, paths):
        return [item.path for item in list_images(images)]
    if isinstance(images, dict) or not hasattr(images, "__iter__"):
        raise InvalidInputError(
            f"cannot read images from a {type(images).__name__}: pass a preprocessed tensor [N, 3, H, W], a PIL "
            "image, an image path, folder, glob or manifest, or a list of these "
            "(datasets and image sources: use vlmood.extract_features)")
    out: list[Any] = []
    for i, x in enumerate(images):
        if _is_pil(x):
            out.append(x)
        elif not isinstance(x, paths):
            raise InvalidInputError(f"image {i} of the list is a {type(x).__name__}; expected a PIL image or an "
                                    "image path (stack preprocessed tensors into one [N, 3, H, W] batch)")
        elif not os.fsdecode(x).strip():
            raise InvalidInputError(f"image {i} of the list is an empty path")
        elif Path(os.fsdecode(x)).expanduser().is_dir():
            out.extend(item.path for item in list_images(x))
        else:
            out.append(x)
    return out


PRECISIONS = ("fp32", "fp16", "bf16")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given, else CUDA when available, else CPU.

    Raises a one-line :class:`InvalidInputError` for an unknown device, one that is not available on this
    machine (``cuda`` without CUDA, ``mps`` off Apple silicon, ``cuda:3`` with two GPUs) and ``meta``
    (which holds no data, so no model can run on it).
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about deprecated names (mkldnn) before we refuse them
            dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidInputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from e
    if dev.type == "cpu":
        return dev
    if dev.type == "meta":
        raise InvalidInputError(f"device {device!r} is not a compute device (it holds no data, only shapes); "
                                "use cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InvalidInputError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
        return dev
    backend = getattr(torch.backends, dev.type, None) if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    try:
        ok = bool(available()) if callable(available) else False
    except Exception:  # a backend that cannot even answer is not usable
        ok = False
    if not ok:
        raise InvalidInputError(f"device {device!r} is not available on this machine; use cpu"
                                + (" or cuda" if torch.cuda.is_available() else ""))
    count = getattr(getattr(torch, dev.type, None), "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= count():
        raise InvalidInputError(f"device {device!r} does not exist: {count()} {dev.type} device(s)")
    return dev


def no_gpu_possible() -> bool:
    """Whether this machine shows no sign of a GPU, decided without importing torch: macOS (no CUDA builds), or Linux
    with neither a device node of an NVIDIA (``/dev/nvidia*``), Tegra/Jetson (``/dev/nvhost*``, ``/dev/nvmap``,
    ``/dev/nvgpu``), ROCm (``/dev/kfd``) or WSL (``/dev/dxg``) GPU, nor an NVIDIA or AMD display device on the PCI bus
    (``/sys/bus/pci/devices``: a GPU whose driver has not created its nodes yet). Anywhere else (Windows...) it
    cannot be told without torch: False. Where this says True, vlmood's deferred loads use the CPU (see
    :func:`device_type_without_torch`)."""
    if sys.platform == "darwin":
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        nodes = os.listdir("/dev")
    except OSError:
        return False
    if any(n.startswith(("nvidia", "nvhost", "nvmap", "nvgpu")) or n in ("kfd", "dxg") for n in nodes):
        return False
    return not _gpu_on_pci()


_PCI_DEVICES = "/sys/bus/pci/devices"


def _gpu_on_pci() -> bool:
    """Whether the PCI bus lists an NVIDIA device (vendor 0x10de) or an AMD display controller (0x1002, class 0x03);
    True when the bus cannot be read (nothing can be ruled out then)."""
    root = _PCI_DEVICES
    try:
        devices = os.listdir(root)
    except FileNotFoundError:
        return False  # no PCI bus exposed (a container without /sys/bus/pci): the device nodes decided
    except OSError:
        return True
    for d in devices:
        try:
            with open(os.path.join(root, d, "vendor")) as f:
                vendor = f.read().strip().lower()
            with open(os.path.join(root, d, "class")) as f:
                cls = f.read().strip().lower()
        except (OSError, ValueError):  # unreadable, or not text: nothing can be ruled out
            return True
        if vendor == "0x10de" or (vendor == "0x1002" and cls.startswith("0x03")):
            return True
    return False


def device_type_without_torch(device: Any) -> str | None:
    """``"cpu"`` when ``device`` is to be the CPU and that can be told without importing torch: ``"cpu"`` itself, or
    None (the default) where this machine shows no sign of a GPU (:func:`no_gpu_possible`) and torch is not loaded
    yet; else None (resolve it with torch). Loads that rely on it (``load_encoder(..., defer=True)``, the CLI's
    ``score --detector``) then load on the CPU, whatever torch would pick."""
    if isinstance(device, str) and device == "cpu":
        return "cpu"
    if device is None and "torch" not in sys.modules and no_gpu_possible():
        return "cpu"
    return None


def _cpu_fp16_autocast_works() -> bool:
    """Whether this torch really computes in fp16 under CPU autocast (older versions silently disable it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device_type="cpu", dtype=torch.float16):
            return (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # an old or unusual build that cannot answer: assume emulation
        return False


def resolve_precision(precision: str | None, device: "torch.device | str") -> str:
    """``precision`` as given, else ``bf16`` (or ``fp16``) on CUDA and ``fp32`` on CPU. ``device``: a resolved
    device, or its type (``"cpu"``).

    A reduced precision holds the weights in that dtype (cast once at load, see :meth:`Encoder.compute_dtype`).
    On CPU, ``fp16`` and ``bf16`` are allowed (features stay within about 1e-2 of fp32) with a warning: ``bf16`` is
    several times faster than fp32 on a CPU with native bf16 (AVX512-BF16, AMX) and slower elsewhere; ``fp16`` is
    slower than fp32 on CPUs. ``fp16`` on a torch whose CPU autocast cannot run fp16 (training code autocasts) is
    refused rather than silently run in fp32.
    """
    kind = device if isinstance(device, str) else device.type
    if precision is None:
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if kind == "cpu" and precision != "fp32":
        if precision == "fp16" and not _cpu_fp16_autocast_works():
            raise InvalidInputError(f"this torch ({torch.__version__}) cannot compute in fp16 on CPU; "
                                    "use precision fp32 (the CPU default) or bf16")
        if precision == "bf16" and _cpu_has_native_bf16():
            warnings.warn("bf16 on CPU: weights held in bf16, usually several times faster than fp32 on this CPU "
                          "(it computes bf16 natively) but slightly less exact; fp32 is the CPU default",
                          stacklevel=3)
        else:
            warnings.warn(f"{precision} on CPU is emulated and usually several times slower than fp32 "
                          "(and slightly less exact); fp32 is the CPU default", stacklevel=3)
    return precision


def precision_dtype(precision: str) -> "torch.dtype":
    """The dtype in which an encoder of ``precision`` (fp32, fp16, bf16) holds its weights and computes."""
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (a no-op for ``fp32``), for training code that runs float32 modules of its own
    (learned prompts, CLIPN's "no" tower) next to an encoder's reduced-precision weights."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision_dtype(precision))


def cast_to_low_precision(model: torch.nn.Module, dtype: torch.dtype, ln_class: type | None = None,
                          ln_types: tuple[type, ...] | None = None,
                          keep: Sequence[str] = ("logit_scale", "logit_bias")) -> None:
    """Cast every floating parameter and buffer of ``model`` to ``dtype`` in place, except: LayerNorms of exactly
    a type in ``ln_types`` (default ``torch.nn.LayerNorm``) become ``ln_class`` (default
    :class:`~vlmood.encoders.lowprec.LayerNormFp32`: float32 parameters, normalising in float32), and the
    parameters named in ``keep`` (the learned temperature and bias, which set the scores' scale) stay float32 and
    exact."""
    from .lowprec import LayerNormFp32

    ln_class = ln_class if ln_class is not None else LayerNormFp32
    ln_types = ln_types if ln_types is not None else (torch.nn.LayerNorm,)
    kept = {name: p.detach().clone() for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in keep}
    model.to(dtype)
    for name, value in kept.items():
        model.get_parameter(name).data = value
    for m in model.modules():
        if type(m) in ln_types:
            m.float()
            m.__class__ = ln_class


def hash_state_dict(state: dict[str, torch.Tensor]) -> str:
    """A content hash (hex) of a state dict: names, shapes, dtypes and bytes of every tensor."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class EncoderSpec:
    """A parsed model spec string.

    Grammar::

        open_clip:ARCH/PRETRAINED      pretrained tag, e.g. open_clip:ViT-B-16/openai
        open_clip:ARCH/none            random initialisation with seed 0 (tests, benchmarks)
        open_clip:ARCH/none:seed=N     random initialisation with seed N (a non-negative integer)
        open_clip:ARCH@/path/to/ckpt   local weights (.safetensors, .pt, .bin)
        open_clip:hf-hub:ORG/REPO      an open_clip model on the Hugging Face hub
        hf:MODEL_ID_OR_DIR             a transformers CLIPModel / SiglipModel
        NAME                           a registered model (see vlmood.encoders.registry), e.g.
        toyworld                       the tiny CLIP vlmood ships, trained on its toy world

    Random initialisation is deterministic: the same spec gives the same weights (and fingerprint, so the
    caches hit) in every process. ``str(spec)`` is canonical and parses back to an equal spec; the seed is
    written when it is not the default 0.
    """

    backend: str  # "open_clip" | "hf"
    name: str  # architecture (open_clip) or model id / directory (hf)
    pretrained: str | None = None  # tag, or None for random init / hf-hub
    checkpoint: Path | None = None  # local weights file
    seed: int = 0  # random-initialisation seed (used only when there are no pretrained weights)

    @property
    def random_init(self) -> bool:
        """Whether the weights are random (no pretrained tag, checkpoint or hub repository)."""
        return (self.backend == "open_clip" and self.pretrained is None and self.checkpoint is None
                and not self.name.startswith("hf-hub:"))

    def __str__(self) -> str:
        if self.backend == "hf":
            return f"hf:{self.name}"
        if self.checkpoint is not None:
            return f"open_clip:{self.name}@{self.checkpoint}"
        if self.name.startswith("hf-hub:"):
            return f"open_clip:{self.name}"
        if self.pretrained is None:
            return f"open_clip:{self.name}/none" + (f":seed={self.seed}" if self.seed else "")
        return f"open_clip:{self.name}/{self.pretrained}"


def _random_init_seed(spec: str, tag: str) -> int | None:
    """The seed of a random-initialisation tag (``none`` -> 0, ``none:seed=N`` -> N), or None for a real tag."""
    head, sep, rest = tag.partition(":")
    if head.lower() != "none":
        if "seed=" in tag:
            raise InvalidInputError(f"model spec {spec!r}: a seed applies only to random initialisation "
                                    "('open_clip:ARCH/none:seed=N')")
        return None
    if not sep:
        return 0
    key, eq, value = rest.partition("=")
    value = value.strip()
    if key.strip().lower() != "seed" or not eq or not (value.isascii() and value.isdigit()) or int(value) >= 2**63:
        raise InvalidInputError(f"model spec {spec!r}: expected 'open_clip:ARCH/none' or 'open_clip:ARCH/none:seed=N' "
                                "with N a non-negative integer below 2**63")
    return int(value)


def parse_spec(spec: str) -> EncoderSpec:
    """Parse a model spec string (see :class:`EncoderSpec`); raises ``InvalidInputError`` naming the problem."""
    from . import registry

    if not isinstance(spec, str) or not spec.strip():
        raise InvalidInputError(f"empty model spec {spec!r}; expected e.g. 'open_clip:ViT-B-16/openai' or 'hf:DIR'")
    spec = spec.strip()
    backend, sep, rest = spec.partition(":")
    if not sep:
        named = registry.resolve_model(spec)
        if named is not None:
            return named
    if not sep or backend not in ("open_clip", "hf"):
        names = registry.model_names()
        close = difflib.get_close_matches(spec, names, n=1, cutoff=0.6) if not sep else []
        hint = f"; did you mean {close[0]!r}?" if close else f" (or be a model name: {', '.join(names)})"
        raise InvalidInputError(
            f"model spec {spec!r} must start with 'open_clip:' or 'hf:' "
            "(e.g. 'open_clip:ViT-B-16/openai', 'open_clip:ViT-B-32@model.safetensors', 'hf:openai/clip-vit-base-patch16')"
            + hint
        )
    if not rest:
        raise InvalidInputError(f"model spec {spec!r} names no model after {backend!r}")
    if backend == "hf":
        return EncoderSpec("hf", rest)
    if rest.startswith("hf-hub:"):
        return EncoderSpec("open_clip", rest)
    if "@" in rest:
        arch, _, path = rest.partition("@")
        if not arch or not path:
            raise InvalidInputError(f"model spec {spec!r}: expected 'open_clip:ARCH@/path/to/checkpoint'")
        return EncoderSpec("open_clip", arch, checkpoint=Path(path).expanduser())
    arch, sep, tag = rest.partition("/")
    if not sep or not arch or not tag:
        raise InvalidInputError(
            f"model spec {spec!r} names no weights: use 'open_clip:{arch or 'ARCH'}/PRETRAINED' "
            f"(e.g. /openai), '/none' for random init, or '@/path/to/checkpoint'"
        )
    seed = _random_init_seed(spec, tag)
    if seed is not None:
        return EncoderSpec("open_clip", arch, seed=seed)
    return EncoderSpec("open_clip", arch, pretrained=tag)


class Encoder(ABC):
    """A CLIP-style image/text encoder pair.

    All features returned are L2-normalised ``float32`` tensors on the CPU.
    Subclasses set ``model``, ``tokenizer``, ``preprocess``, ``device``, ``precision`` and ``spec``.
    """

    model: torch.nn.Module
    tokenizer: Any
    preprocess: Callable[[Any], torch.Tensor]
    device: torch.device
    precision: str
    spec: EncoderSpec
    image_batch_size: int = 64
    text_batch_size: int = 256

    # ---------------------------------------------------------------- properties
    @property
    @abstractmethod
    def logit_scale(self) -> float:
        """The model's learned inverse temperature ``exp(t)`` (about 100 for CLIP)."""

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Dimension ``D`` of the joint embedding space."""

    @property
    def supports_local(self) -> bool:
        """Whether ``encode_images(..., local=True)`` can return per-patch features."""
        return False

    def require_local(self) -> None:
        """Raise a clear error when this encoder cannot give per-patch features (GL-MCM needs them)."""
        if not self.supports_local:
            raise InvalidInputError(
                f"{self.spec} has no local (per-patch) features; GL-MCM needs an open_clip ViT or ModifiedResNet "
                "image tower (Hugging Face backends give global features only)"
            )

    @property
    def preprocess_key(self) -> str:
        """A string that changes whenever image preprocessing changes (part of the feature-cache key)."""
        return repr(self.preprocess)

    @property
    def exact_text_trimming(self) -> bool:
        """Whether text batches are run only up to their longest prompt (exact for causal towers)."""
        return False

    @property
    def word_level_tokenizer(self) -> bool:
        """Whether the tokenizer maps every word outside its vocabulary to one unknown token (the toy world's);
        BPE tokenizers (CLIP's, Hugging Face's) have no unknown words."""
        return bool(getattr(getattr(self, "tokenizer", None), "word_level", False))

    @property
    def fingerprint(self) -> str:
        """Stable string naming the architecture and the exact weights; used as a cache key."""
        fp = getattr(self, "_fingerprint", None)
        if fp is None:
            fp = f"{self.spec.backend}:{self._arch_name()}:{hash_state_dict(self.model.state_dict())}"
            self._fingerprint = fp
        return fp

    def _arch_name(self) -> str:
        return self.spec.name

    @property
    def device_name(self) -> str:
        """``str(self.device)`` (``"cpu"``, ``"cuda:0"``...), as provenance records it."""
        return str(self.device)

    @property
    def cache_precision(self) -> str:
        """The precision as caches key it: ``fp32``, or ``bf16-weights`` / ``fp16-weights`` (weights cast once). Entries
        written by earlier versions under ``bf16``/``fp16`` came from autocast over fp32 weights, up to ~1e-2 away:
        never served to the cast weights."""
        return self.precision if self.precision == "fp32" else f"{self.precision}-weights"

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the towers' weights and of their forwards: float32 for ``fp32``; for ``bf16``/``fp16`` the
        weights are cast once at load (as open_clip's own ``precision`` option does: matrix weights and projections
        in that dtype, LayerNorms and the logit scale in float32). Returned features are float32 either way."""
        return precision_dtype(self.precision)

    def _hold_precision(self, model: torch.nn.Module) -> None:
        """Cast ``model`` (still on the CPU) to :attr:`precision` once. The fingerprint is taken first, from the
        float32 weights, so it names the weights, never the precision: caches key the precision apart themselves."""
        if self.precision == "fp32":
            return
        self.fingerprint  # noqa: B018 - computed now, while the weights are float32
        self._cast_weights(model, self.compute_dtype)

    def _cast_weights(self, model: torch.nn.Module, dtype: torch.dtype) -> None:
        """Cast the weights to a reduced ``dtype`` (the backends override it to match their libraries)."""
        cast_to_low_precision(model, dtype)

    def _own_forward(self) -> contextlib.AbstractContextManager:
        """Context for the encoder's own forwards: autocast off, since the weights already are in
        :attr:`compute_dtype` (an enclosing :meth:`autocast` would only add casts and change rounding)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, enabled=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to :attr:`precision` (a no-op for fp32), for training code that runs float32 modules of its
        own (learned prompts, CLIPN's "no" tower) together with this encoder's reduced-precision weights."""
        return autocast_context(self.device, self.precision)

    # ---------------------------------------------------------------- images
    def encode_images(
        self, images: ImageInput, local: bool = False, batch_size: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embed images.

        Args:
            images: a preprocessed tensor ``[N, 3, H, W]``; or one PIL image, image path, folder, glob or
                manifest, or a sequence of PIL images, paths and folders (see :func:`image_items`; decoded
                with :func:`vlmood.data.load_image` and transformed with ``preprocess``).
            local: also return per-patch features (ViT towers; see :attr:`supports_local`).
            batch_size: images per forward pass (default ``image_batch_size``).

        Returns:
            ``[N, D]`` L2-normalised global features, or with ``local=True`` a pair
            ``([N, D], [N, P, D])`` where ``P`` is the number of patches.
        """
        if local:
            self.require_local()
        bs = batch_size or self.image_batch_size
        globals_, locals_ = [], []
        for batch in self._image_batches(images, bs):
            with torch.inference_mode(), self._own_forward():
                out = self._encode_image_batch(batch.to(self.device, self.compute_dtype, non_blocking=True), local)
            g, loc = out if local else (out, None)
            globals_.append(torch.nn.functional.normalize(g.float(), dim=-1).cpu())
            if loc is not None:
                locals_.append(torch.nn.functional.normalize(loc.float(), dim=-1).cpu())
        d = self.embed_dim
        g = torch.cat(globals_) if globals_ else torch.empty(0, d)
        bad = int((~torch.isfinite(g).all(dim=-1)).sum())
        if bad:  # kept (detectors score them NaN, i.e. OOD), but never silently
            warnings.warn(f"{bad} of {len(g)} image(s) gave non-finite features on {self.describe()}; their scores "
                          "will be NaN (counted as OOD)" + ("; fp32 avoids fp16 overflow" if self.precision == "fp16"
                                                           else ""), stacklevel=2)
        if not local:
            return g
        return g, (torch.cat(locals_) if locals_ else torch.empty(0, 0, d))

    def _image_batches(self, images: ImageInput, bs: int) -> Iterator[torch.Tensor]:
        if isinstance(images, np.ndarray) and (images.dtype.kind in "biuf"):  # numeric: a preprocessed batch
            images = torch.as_tensor(images)
        if isinstance(images, torch.Tensor):
            shape = tuple(images.shape)
            if images.ndim != 4 or (shape[1] != 3 and shape[-1] == 3) or not images.is_floating_point():
                one = images.ndim == 3 and shape[0] == 3 and images.is_floating_point()
                hint = (" (one image: add a batch axis, x[None])" if one else
                        " (decoded pixels: pass PIL images, e.g. PIL.Image.fromarray(a), so they are preprocessed)")
                raise InvalidInputError(f"an image tensor must be a preprocessed float batch [N, 3, H, W], got "
                                        f"{images.dtype} {shape}{hint}")
            images = images.float()  # float64 (numpy's default) or half: cast to compute_dtype per batch
            for i in range(0, images.shape[0], bs):
                yield images[i : i + bs]
            return
        from ..data import load_image

        items = image_items(images)
        for i in range(0, len(items), bs):
            chunk = [self.preprocess(load_image(x)) for x in items[i : i + bs]]
            yield torch.stack(chunk)

    @abstractmethod
    def _encode_image_batch(self, batch: torch.Tensor, local: bool):
        """Unnormalised features of one preprocessed batch on ``self.device``."""

    # ---------------------------------------------------------------- texts
    def encode_texts(
        self,
        texts: Sequence[str],
        batch_size: int | None = None,
        cache: Any = None,
        progress: bool | None = None,
    ) -> torch.Tensor:
        """Embed prompts: ``[M, D]`` L2-normalised.

        Prompts are sorted by token length and each batch runs only up to its longest prompt
        when the tower allows it exactly (:attr:`exact_text_trimming`). ``cache`` may be an
        :class:`vlmood.text.EmbeddingCache`, ``True`` for the default cache, or ``None``/``False``.
        ``progress``: show a progress bar (``None``: only for large sets on a terminal).
        """
        from ..text.embed import embed_texts

        return embed_texts(self, texts, batch_size=batch_size, cache=cache, progress=progress)

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Token ids ``[M, L]`` (full context) and each prompt's length up to and including its end token."""

    @abstractmethod
    def _encode_token_batch(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """Unnormalised features of a token batch on ``self.device``, run over the first ``length`` positions."""

    def describe(self) -> str:
        return f"{self.spec} on {self.device} ({self.precision})"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
