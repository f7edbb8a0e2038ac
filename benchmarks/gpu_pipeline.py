"""End-to-end images/s on one GPU, JPEG decoding on the CPU or on the GPU, six detectors, and the stage that limits it.

Usage (one command on a GPU machine; no data needed, synthetic JPEGs are written to a temporary folder):

    python benchmarks/gpu_pipeline.py --images 10000 --out gpu_pipeline.json

Model ``open_clip:ViT-B-16/none`` (random weights: speed depends on shapes, not on training) at bf16 on the GPU, ID
classes ``imagenet1k``, six detectors: MCM, GL-MCM (patch features), Energy, MaxLogit, NegLabel (the 70,794-word
lexicon, 100 groups) and CLIPN (CTW; its no side is a seeded perturbation of the text tower, as in gpu_check.py).
The images are ``--images`` JPEGs of ImageNet's typical sizes (500x375, 375x500, 500x333; noise and shapes, quality
90), read from the page cache (a cold disk is not measured).

(a) ``cpu-decode``: vlmood's own path: ``extract_features(local=True)`` (PIL decoding and preprocessing in
    ``--workers`` DataLoader workers, pinned memory, the image tower on the GPU), then every detector's
    ``score_features`` (on the CPU, as ``Benchmark.run`` scores).
(b) ``gpu-decode``: file bytes read by threads, ``torchvision.io.decode_jpeg(list, device="cuda")`` (nvjpeg,
    batched), resize + centre crop + normalise on the GPU reproducing the encoder's PIL preprocess (two separable
    passes rounded to 8 bits between them, as Pillow resamples; see :func:`tensor_preprocess`), the image tower,
    and the six scores on the GPU (:class:`DeviceScorer`, the detectors' formulas in float32; only [N] scores come
    back to the host).

Reported: images/s end to end of each, the time projected for the ImageNet OOD benchmark (90,000 images; issue 12's
target is under 60 s, about 1,500 images/s), per-stage throughput (file read, decode, resize/preprocess, transfer,
image tower, scoring) and the stage that limits each pipeline; the agreement of (b) with (a) on the same images
(same class, largest score difference per detector); the GPU preprocess against the PIL preprocess (pixels and
features); and the NegLabel lexicon (70,794 prompts) encoded cold: tokenisation alone, the tower alone and
``compute_text_embeddings`` as users call it, per text batch size (issue 12's target: under 2 s).

Without a GPU it runs the CPU side of both pipelines on a few images (``--cpu-images``, default 8) with a small text
side (cifar10 classes, a 487-word lexicon), checks the tensor preprocess against PIL and the on-device scores against
the detectors' own, times the tokenisation of 10,000 lexicon prompts, and says what it skipped and the command to run
on a GPU (``--all-stages`` runs the GPU side's remaining measurements on the CPU too, as a dry run of that code).
Results go to stdout and ``--out`` (JSON, written atomically).

Preprocess tolerance (tests/test_gpu_pipeline.py, CPU decoder): against ``load_image`` + the encoder's preprocess, at
most 1 level of 8 bits anywhere and under 0.1% of values off by a level on 500x375, 375x500, 500x333, 640x480, 100x80
and 224x224 JPEGs; the features of a random ViT-B-16 agree to a cosine of 1.000000. nvjpeg's decoding differs from
libjpeg-turbo's by its own rounding: the GPU run measures it (``preprocess_check``).

Not yet run on a GPU: no device was lent to the session that wrote it; gpu_check.py's H200 run (777 images/s with PIL
decoding of 64 px toy images, the lexicon in 10.2 s) is the last GPU figure.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

GPU_COMMAND = "python benchmarks/gpu_pipeline.py --images 10000 --out gpu_pipeline.json"
SIZES = ((500, 375), (500, 375), (500, 375), (375, 500), (500, 333))  # (width, height): ImageNet's common shapes
SMALL_LEXICON = ["noun.motive", "noun.Tops", "noun.shape", "adj.ppl"]  # 487 words: the CPU run's NegLabel
PROJECT_IMAGES = 90_000  # ImageNet OOD benchmark: 50k ID + about 40k OOD images
TARGET_S = 60.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------- synthetic data
def _photo_like(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A photo-like JPEG (quality 90): a smooth colour field, a few filled shapes, sensor-like noise."""
    from PIL import Image, ImageDraw

    base = (rng.random((h // 25 + 2, w // 25 + 2, 3)) * 255).astype(np.uint8)
    im = Image.fromarray(base).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 10))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, 250)), y0 + int(rng.integers(20, 250))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    arr = np.asarray(im).astype(np.int16) + rng.normal(0, 8, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_jpegs(folder: str | os.PathLike, n: int, seed: int = 0, distinct: int = 256) -> list[str]:
    """Write ``n`` JPEGs into ``folder`` (``distinct`` different images, cycled; sizes cycle through :data:`SIZES`)
    and return their paths. Identical bytes under two names cost the same to decode; the feature cache is off."""
    rng = np.random.default_rng(seed)
    datas = [_photo_like(rng, *SIZES[k % len(SIZES)]) for k in range(min(n, distinct))]
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"img{i:06d}.jpg")
        with open(p, "wb") as f:
            f.write(datas[i % len(datas)])
        paths.append(p)
    return paths


# ------------------------------------------------------------------------------------------- tensor preprocess
@dataclass(frozen=True)
class Plan:
    """The encoder's PIL preprocess as numbers: resize (an int: the short side, torchvision's rule; a pair: both
    sides), interpolation, centre crop, normalisation."""

    size: int | tuple[int, int]
    max_size: int | None
    mode: str  # "bicubic" or "bilinear"
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def preprocess_plan(preprocess: Any) -> Plan:
    """Read a torchvision ``Compose`` of Resize, CenterCrop, RGB conversion, ToTensor and Normalize (open_clip's
    eval preprocess) into a :class:`Plan`; any other transform raises ``ValueError`` naming it (the GPU path would
    not reproduce it)."""
    from torchvision import transforms as T

    size = max_size = mode = crop = mean = std = None
    for t in getattr(preprocess, "transforms", [preprocess]):
        name = type(t).__name__
        if isinstance(t, T.Resize):
            s = t.size
            size = s if isinstance(s, int) else (s[0] if len(s) == 1 else (int(s[0]), int(s[1])))
            max_size, mode = t.max_size, t.interpolation.value
            if mode not in ("bicubic", "bilinear") or t.antialias is False:
                raise ValueError(f"resize with {mode} interpolation (antialias={t.antialias}) is not reproduced")
        elif isinstance(t, T.CenterCrop):
            crop = (int(t.size[0]), int(t.size[1]))
        elif isinstance(t, T.Normalize):
            mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
        elif name in ("MaybeConvertMode", "MaybeToTensor", "ToTensor") or name.startswith("_convert_to_rgb") \
                or getattr(t, "__name__", "") == "_convert_to_rgb":
            continue  # decoded as RGB, scaled to [0, 1] below
        else:
            raise ValueError(f"preprocess step {t!r} is not reproduced by the GPU path")
    if size is None or crop is None or mean is None:
        raise ValueError(f"preprocess {preprocess!r} lacks a Resize, a CenterCrop or a Normalize")
    return Plan(size, max_size, mode, crop, mean, std)  # type: ignore[arg-type]


def resized_size(h: int, w: int, plan: Plan) -> tuple[int, int]:
    """``(new_h, new_w)`` by torchvision's rule (the same for PIL images and tensors)."""
    if isinstance(plan.size, tuple):
        return plan.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = plan.size, int(plan.size * long / short)
    if plan.max_size is not None and new_long > plan.max_size:
        new_short, new_long = int(plan.max_size * new_short / new_long), plan.max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _resample(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """One antialiased pass on 0..255 floats, rounded and clamped to 8-bit levels (as Pillow stores each pass)."""
    return F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False).round_().clamp_(0, 255)


def tensor_preprocess(images: Sequence[torch.Tensor], plan: Plan) -> torch.Tensor:
    """Decoded RGB ``uint8 [3, H, W]`` tensors (any device) -> ``float32 [N, 3, crop_h, crop_w]``, normalised.

    Reproduces the PIL preprocess: Pillow resizes 8-bit images in two separable passes, horizontal then vertical,
    rounding to 8 bits in between; here each pass is one ``interpolate(antialias=True)`` rounded the same way
    (one pass in float differs from PIL by up to 3-6 levels, two rounded passes by at most 1 on most sizes; some
    Pillow versions run the vertical pass first on some sizes, up to ~7 levels then, mean well under 1).
    Images of equal size are resized together.
    """
    from torchvision.transforms.v2 import functional as TF

    out: list[torch.Tensor | None] = [None] * len(images)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault((int(im.shape[-2]), int(im.shape[-1])), []).append(i)
    for (h, w), idx in groups.items():
        x = torch.stack([images[i] for i in idx]).float()
        nh, nw = resized_size(h, w, plan)
        if nw != w:
            x = _resample(x, (h, nw), plan.mode)
        if nh != h:
            x = _resample(x, (nh, nw), plan.mode)
        x = TF.center_crop(x, list(plan.crop))
        for k, i in enumerate(idx):
            out[i] = x[k]
    batch = torch.stack(out)  # type: ignore[arg-type]
    mean = torch.tensor(plan.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(plan.std, device=batch.device).view(1, 3, 1, 1)
    return (batch / 255.0 - mean) / std


def read_bytes(path: str) -> torch.Tensor:
    return torch.from_numpy(np.fromfile(path, dtype=np.uint8))


def decode_batch(datas: list[torch.Tensor], paths: Sequence[str], enc: Any, plan: Plan,
                 device: torch.device) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """JPEG bytes -> preprocessed batch on ``device``: ``decode_jpeg(list, device=...)`` (nvjpeg on CUDA), then
    :func:`tensor_preprocess`. A batch the decoder refuses (a corrupt or non-JPEG file) is retried one image at a
    time, and an image it still refuses goes through vlmood's PIL path (``load_image`` + ``enc.preprocess``); an
    unreadable one is returned in the errors. Returns ``(batch, kept positions, errors)``. EXIF orientation is not
    applied on the GPU (nvjpeg); vlmood's PIL path applies it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from vlmood.data import load_image
    from vlmood.errors import ImageLoadError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
        try:
            decoded: list[Any] = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            decoded = []
            for d in datas:
                try:
                    decoded.append(decode_jpeg([d], mode=ImageReadMode.RGB, device=device)[0])
                except RuntimeError:
                    decoded.append(None)
    ok = [i for i, im in enumerate(decoded) if im is not None]
    parts, kept, errors = [], list(ok), []
    if ok:
        parts.append(tensor_preprocess([decoded[i] for i in ok], plan))
    for i in (i for i, im in enumerate(decoded) if im is None):
        try:
            parts.append(enc.preprocess(load_image(paths[i]))[None].to(device))
            kept.append(i)
        except ImageLoadError as e:
            errors.append((paths[i], str(e)))
    if not parts:
        return torch.empty(0, 3, *plan.crop, device=device), [], errors
    order = sorted(range(len(kept)), key=kept.__getitem__)
    return torch.cat(parts)[order], sorted(kept), errors


# ------------------------------------------------------------------------------------------------- detectors
def build_detectors(enc: Any, classes: str, lexicon: Any, ngroups: int) -> dict[str, Any]:
    """MCM, GL-MCM, Energy, MaxLogit, NegLabel and CLIPN (CTW, no side: ``gpu_check._no_side``), fitted."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_gpu_check", Path(__file__).resolve().parent / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)  # loaded by path: benchmarks/ stays off sys.path
    spec.loader.exec_module(gpu_check)  # type: ignore[union-attr]
    _no_side = gpu_check._no_side

    from vlmood.detectors import CLIPN, GLMCM, MCM, Energy, MaxLogit, NegLabel

    dets = {"mcm": MCM(enc, classes), "glmcm": GLMCM(enc, classes), "energy": Energy(enc, classes),
            "maxlogit": MaxLogit(enc, classes), "neglabel": NegLabel(enc, classes, lexicon=lexicon, ngroups=ngroups),
            "clipn": CLIPN(_no_side(enc), classes, templates="simple")}
    for d in dets.values():
        d.fit()
    return dets


def _max_softmax(x: torch.Tensor) -> torch.Tensor:
    """``max_c softmax(x)_c`` as :func:`vlmood.scores._max_softmax` computes it."""
    m = x.max(dim=-1, keepdim=True).values
    return torch.exp(-torch.logsumexp(x - m, dim=-1))


class DeviceScorer:
    """The six detectors' scores computed where the features are (float32), so that only ``[N]`` scores leave the
    GPU: the formulas of :mod:`vlmood.scores` as each detector's ``score_features`` applies them (which computes
    on the CPU, in float64, from features brought to the host). Rows with non-finite features score NaN, as there."""

    def __init__(self, dets: dict[str, Any], device: torch.device):
        from vlmood.detectors import CLIPN, GLMCM, MCM, Energy, MaxLogit, NegLabel

        self.texts: list[torch.Tensor] = []  # unique ID text matrices [D, C] (detectors sharing classes/templates)
        self.rules: list[tuple[str, str, int, dict[str, Any]]] = []
        for name, det in dets.items():
            text = det.text_features
            k = next((j for j, t in enumerate(self.texts) if t.shape[1] == text.shape[0]
                      and torch.equal(t.cpu(), text.T)), None)
            if k is None:
                self.texts.append(text.T.contiguous().to(device))
                k = len(self.texts) - 1
            if isinstance(det, CLIPN):
                p = {"scale": det.scale, "no": det.text_features_no.T.contiguous().to(device), "rule": det.score_rule}
                kind = "clipn"
            elif isinstance(det, NegLabel):
                m = det.negative_features.shape[0]
                order = (torch.randperm(m, generator=torch.Generator().manual_seed(det.seed)) if det.seed is not None
                         else torch.arange(m))
                size = m // det.ngroups
                p = {"neg": det.negative_features.T.contiguous().to(device), "temperature": det.temperature,
                     "groups": order[: size * det.ngroups].view(det.ngroups, size).to(device)}
                kind = "neglabel"
            elif isinstance(det, GLMCM):
                p, kind = {"temperature": det.temperature, "lam": det.lam}, "glmcm"
            elif isinstance(det, MCM):
                p, kind = {"temperature": det.temperature}, "mcm"
            elif isinstance(det, (Energy, MaxLogit)):
                scale = det.encoder.logit_scale if det.logit_scale is None else det.logit_scale
                p = {"scale": scale, "temperature": getattr(det, "temperature", 1.0)}
                kind = "energy" if isinstance(det, Energy) else "maxlogit"
            else:
                raise ValueError(f"no on-device scoring for {type(det).__name__}")
            self.rules.append((name, kind, k, p))

    def __call__(self, g: torch.Tensor, loc: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Scores ``{name: [N]}`` and ``"pred"`` (the class of the first ID text side) of L2-normalised global
        ``[N, D]`` and local ``[N, P, D]`` float32 features, on their device."""
        sims = [g @ t for t in self.texts]
        bad = ~torch.isfinite(g).all(dim=1)
        out: dict[str, torch.Tensor] = {"pred": sims[0].argmax(dim=-1)}
        for name, kind, k, p in self.rules:
            s = sims[k]
            if kind == "mcm":
                r = _max_softmax(s / p["temperature"])
            elif kind == "maxlogit":
                r = p["scale"] * s.max(dim=-1).values
            elif kind == "energy":
                r = p["temperature"] * torch.logsumexp(p["scale"] * s / p["temperature"], dim=-1)
            elif kind == "glmcm":
                t, tt = self.texts[k], p["temperature"]
                local = torch.cat([_max_softmax((loc[i : i + 128] @ t) / tt).amax(dim=-1)
                                   for i in range(0, loc.shape[0], 128)])  # [128, P, C] at a time
                r = _max_softmax(s / tt) + p["lam"] * local
                r = r.masked_fill(~torch.isfinite(loc).flatten(1).all(dim=1), float("nan"))
            elif kind == "neglabel":
                tt = p["temperature"]
                lse_id = torch.logsumexp(s / tt, dim=1, keepdim=True)
                lse_neg = torch.logsumexp(((g @ p["neg"]) / tt)[:, p["groups"]], dim=2)
                r = torch.sigmoid(lse_id - lse_neg).mean(dim=1)
            else:  # clipn
                ly, ln = p["scale"] * s, p["scale"] * (g @ p["no"])
                if p["rule"] == "ctw":
                    pred = ly.argmax(dim=-1, keepdim=True)
                    r = torch.sigmoid(ly.gather(1, pred) - ln.gather(1, pred)).squeeze(1)
                else:
                    r = (torch.softmax(ly, dim=-1) * torch.sigmoid(ly - ln)).sum(dim=-1)
            out[name] = r.masked_fill(bad, float("nan"))
        return out


# ------------------------------------------------------------------------------------------------- pipelines
def _forward(enc: Any) -> tuple[Any, torch.dtype]:
    """The context and input dtype of the encoder's own forwards, as ``Encoder.encode_images`` runs them: weights
    held in the compute dtype with autocast off (``_own_forward``), or, on a vlmood without it, autocast over
    float32 weights."""
    if hasattr(enc, "_own_forward"):
        return enc._own_forward(), getattr(enc, "compute_dtype", torch.float32)
    return enc.autocast(), next(enc.model.parameters()).dtype


def _tower(enc: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised float32 global and local features of a preprocessed batch already on the encoder's device."""
    ctx, dtype = _forward(enc)
    with torch.inference_mode(), ctx:
        g, loc = enc._encode_image_batch(x.to(dtype), True)
    return F.normalize(g.float(), dim=-1), F.normalize(loc.float(), dim=-1)


def run_cpu_decode(enc: Any, paths: list[str], dets: dict[str, Any], batch_size: int, workers: int) -> dict[str, Any]:
    """(a) vlmood's path: ``extract_features(local=True)`` then each detector's ``score_features``."""
    from vlmood.features import extract_features

    dev = enc.device
    _sync(dev)
    t0 = time.perf_counter()
    feats = extract_features(enc, paths, local=True, cache=False, batch_size=batch_size, num_workers=workers,
                             progress=False)
    _sync(dev)
    t1 = time.perf_counter()
    scores = {name: det.score_features(feats) for name, det in dets.items()}
    t2 = time.perf_counter()
    n = len(paths)
    return {"images": n, "workers": workers, "batch_size": batch_size, "features_s": t1 - t0, "scoring_s": t2 - t1,
            "total_s": t2 - t0, "images_per_s": n / (t2 - t0), "features_images_per_s": n / (t1 - t0),
            "scoring_images_per_s": n / (t2 - t1), "_scores": scores,
            "_pred": dets["mcm"].classify_features(feats), "_features": feats}


def run_gpu_decode(enc: Any, paths: list[str], plan: Plan, scorer: DeviceScorer, batch_size: int,
                   read_threads: int, staged: bool) -> dict[str, Any]:
    """(b) bytes read by ``read_threads`` threads (prefetched two batches ahead), decoded and preprocessed on the
    encoder's device, the tower, the scores on the device. ``staged``: synchronise after every stage and time each
    (file read is then not overlapped); otherwise one synchronisation at the end (the end-to-end figure)."""
    dev = enc.device
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    stages = dict.fromkeys(("read", "decode", "preprocess", "tower", "scoring"), 0.0)
    outs: dict[str, list[torch.Tensor]] = {}
    errors: list[tuple[str, str]] = []
    kept_total = 0
    with ThreadPoolExecutor(max_workers=read_threads) as pool:
        def submit(b: list[str]) -> list[Any]:
            return [pool.submit(read_bytes, p) for p in b]

        pending = [submit(b) for b in batches[:2]] if not staged else []
        _sync(dev)
        t_start = time.perf_counter()
        for k, b in enumerate(batches):
            t = time.perf_counter()
            if staged:
                datas = [read_bytes(p) for p in b]
            else:
                if k + 2 < len(batches):
                    pending.append(submit(batches[k + 2]))
                datas = [f.result() for f in pending.pop(0)]
            stages["read"] += time.perf_counter() - t
            if staged:
                from torchvision.io import ImageReadMode, decode_jpeg

                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev)
                _sync(dev)
                stages["decode"] += time.perf_counter() - t
                t = time.perf_counter()
                x = tensor_preprocess(decoded, plan)
                _sync(dev)
                stages["preprocess"] += time.perf_counter() - t
                kept = list(range(len(b)))
            else:
                x, kept, errs = decode_batch(datas, b, enc, plan, dev)
                errors += errs
            t = time.perf_counter()
            g, loc = _tower(enc, x)
            if staged:
                _sync(dev)
                stages["tower"] += time.perf_counter() - t
                t = time.perf_counter()
            s = scorer(g, loc)
            if staged:
                _sync(dev)
                stages["scoring"] += time.perf_counter() - t
            for name, v in s.items():
                outs.setdefault(name, []).append(v)
            kept_total += len(kept)
        result = {name: torch.cat(v).cpu().numpy() for name, v in outs.items()}  # one synchronisation
        total = time.perf_counter() - t_start
    n = len(paths)
    res: dict[str, Any] = {"images": n, "scored": kept_total, "errors": errors, "batch_size": batch_size,
                           "read_threads": read_threads, "total_s": total, "images_per_s": n / total,
                           "_scores": {k: v for k, v in result.items() if k != "pred"}, "_pred": result["pred"]}
    if staged:
        res["stages_s"] = stages
        res["stages_images_per_s"] = {k: (n / v if v > 0 else math.inf) for k, v in stages.items()}
    return res


def stage_rates(enc: Any, paths: list[str], batch_size: int, workers: int, read_threads: int,
                sample: int = 128) -> dict[str, Any]:
    """Each stage of pipeline (a) alone, in images/s: file read (``read_threads`` threads), PIL decode and PIL
    preprocess (one process on ``sample`` images, then times ``workers``, as if the workers had a core each), pinned
    host-to-device copy of a preprocessed batch, the image tower on a batch already on the device."""
    from vlmood.data import load_image

    dev = enc.device
    out: dict[str, Any] = {}
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=read_threads) as pool:
        nbytes = sum(d.numel() for d in pool.map(read_bytes, paths))
    dt = time.perf_counter() - t
    out["read"] = {"images_per_s": len(paths) / dt, "MB_per_s": nbytes / dt / 1e6, "threads": read_threads}
    few = paths[:sample]
    t = time.perf_counter()
    ims = [load_image(p) for p in few]
    dec = time.perf_counter() - t
    t = time.perf_counter()
    xs = [enc.preprocess(im) for im in ims]
    pre = time.perf_counter() - t
    w = max(1, workers)
    out["pil_decode"] = {"per_process_images_per_s": len(few) / dec, "images_per_s": w * len(few) / dec, "workers": w}
    out["pil_preprocess"] = {"per_process_images_per_s": len(few) / pre, "images_per_s": w * len(few) / pre,
                             "workers": w}
    out["pil_decode_and_preprocess"] = {"images_per_s": w * len(few) / (dec + pre), "workers": w}
    batch = torch.stack([xs[i % len(xs)] for i in range(batch_size)])
    reps = 1 if dev.type == "cpu" else 20
    if dev.type == "cuda":
        pinned = batch.pin_memory()
        pinned.to(dev, non_blocking=True)
        _sync(dev)
        t = time.perf_counter()
        for _ in range(reps):
            pinned.to(dev, non_blocking=True)
        _sync(dev)
        out["transfer"] = {"images_per_s": reps * batch_size / (time.perf_counter() - t), "pinned": True}
    else:
        out["transfer"] = {"skipped": "CPU: no host-to-device copy"}
    x = batch.to(dev)
    if dev.type == "cuda":
        _tower(enc, x)  # warm-up (kernels, cuBLAS)
        _sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        _tower(enc, x)
    _sync(dev)
    out["tower"] = {"images_per_s": reps * batch_size / (time.perf_counter() - t), "batch_size": batch_size,
                    "precision": enc.precision}
    return out


def limiting(rates: dict[str, float]) -> str:
    """The stage with the lowest throughput."""
    return min(rates, key=rates.get)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------- checks
def preprocess_check(enc: Any, paths: list[str], plan: Plan, device: torch.device) -> dict[str, Any]:
    """The tensor preprocess of ``decode_jpeg(device=...)`` against vlmood's PIL path (``load_image`` +
    ``enc.preprocess``) on the same files: pixel differences (normalised units and 8-bit levels) and the cosine of
    the image features each gives."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from vlmood.data import load_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = decode_jpeg([read_bytes(p) for p in paths], mode=ImageReadMode.RGB, device=device)
    mine = tensor_preprocess(decoded, plan).cpu()
    ref = torch.stack([enc.preprocess(load_image(p)) for p in paths])
    d = (mine - ref).abs()
    levels = d * torch.tensor(plan.std).view(1, 3, 1, 1) * 255
    ga, _ = _tower(enc, mine.to(enc.device))
    gb, _ = _tower(enc, ref.to(enc.device))
    cos = (ga * gb).sum(dim=-1)
    return {"images": len(paths), "decoder": "nvjpeg" if device.type == "cuda" else "libjpeg (CPU)",
            "max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
            "max_levels": float(levels.max()), "mean_levels": float(levels.mean()),
            "share_of_values_differing": float((levels > 0.5).float().mean()), "min_feature_cosine": float(cos.min())}


def agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """(b)'s scores against (a)'s on the same images: same class, largest score difference and the score range."""
    rows: dict[str, Any] = {"same_class": float(np.mean(np.asarray(a["_pred"]) == np.asarray(b["_pred"])))}
    for name, sa in a["_scores"].items():
        sb = np.asarray(b["_scores"][name], dtype=np.float64)
        rows[name] = {"max_score_diff": float(np.nanmax(np.abs(np.asarray(sa) - sb))),
                      "score_range": float(np.nanmax(sa) - np.nanmin(sa))}
    return rows


# --------------------------------------------------------------------------------------------- lexicon (issue 12.4)
def lexicon_prompts(limit: int | None = None) -> list[str]:
    """NegLabel's prompts for its default lexicon: ``the nice {}`` for nouns, ``This is a {} photo`` for adjectives."""
    from vlmood import lexicons
    from vlmood.text.prompts import fill, load_templates

    noun, adj = load_templates("neglabel_noun")[0], load_templates("neglabel_adj")[0]
    lex = lexicons.load("neglabel")
    prompts = [fill(noun if p == "noun" else adj, w) for w, p in zip(lex.words, lex.pos)]
    return prompts[:limit]


def lexicon_timing(enc: Any, batch_sizes: Sequence[int], limit: int | None = None,
                   full: bool | None = None) -> dict[str, Any]:
    """The lexicon encoded cold (no embedding cache): ``compute_text_embeddings`` as a fresh process runs it (its
    tokeniser's BPE cache empty), tokenisation alone (fresh tokeniser and warm), then per batch size the call again
    (warm BPE) and the tower alone (tokens on the device, length-sorted trimmed batches, no host copies).
    Without CUDA (unless ``full``) only the tokenisation is timed."""
    from vlmood.text.embed import compute_text_embeddings

    prompts = lexicon_prompts(limit)
    dev = enc.device
    res: dict[str, Any] = {"prompts": len(prompts), "device": str(dev), "precision": enc.precision}
    full = dev.type == "cuda" if full is None else full

    def fresh_tokenizer() -> Any:
        import copy

        tok = copy.copy(enc.tokenizer)
        if isinstance(getattr(tok, "cache", None), dict):  # open_clip SimpleTokenizer: per-instance BPE cache
            keep = {k: v for k, v in tok.cache.items() if k.startswith("<")}  # the special tokens it starts with
            tok.cache = keep
        return tok

    if full:
        compute_text_embeddings(enc, ["a warm-up prompt"] * 8, batch_size=8, progress=False)
        enc.tokenizer = fresh_tokenizer()
        _sync(dev)
        t = time.perf_counter()
        emb = compute_text_embeddings(enc, prompts, batch_size=batch_sizes[0], progress=False)
        _sync(dev)
        res["cold_s"] = time.perf_counter() - t
        res["cold_batch_size"] = batch_sizes[0]
        res["finite"] = bool(torch.isfinite(emb).all())
    tok = fresh_tokenizer()
    t = time.perf_counter()
    tok(prompts)
    res["tokenize_fresh_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tokens, lengths = enc.tokenize(prompts)
    res["tokenize_warm_s"] = time.perf_counter() - t
    res["mean_tokens"] = float(np.mean(lengths))
    if not full:
        res["skipped"] = "no CUDA device: the lexicon's encoding on the GPU (cold call, tower alone per batch size)"
        return res
    order = torch.argsort(torch.tensor(lengths), stable=True)
    tok_dev = tokens[order].to(dev)
    len_sorted = torch.tensor(lengths)[order]
    res["per_batch_size"] = {}
    for bs in batch_sizes:
        row: dict[str, Any] = {}
        _sync(dev)
        t = time.perf_counter()
        compute_text_embeddings(enc, prompts, batch_size=bs, progress=False)
        _sync(dev)
        row["compute_text_embeddings_s"] = time.perf_counter() - t
        _sync(dev)
        t = time.perf_counter()
        with torch.inference_mode(), _forward(enc)[0]:
            for i in range(0, len(prompts), bs):
                enc._encode_token_batch(tok_dev[i : i + bs], int(len_sorted[i : i + bs].max()))
        _sync(dev)
        row["tower_only_s"] = time.perf_counter() - t
        res["per_batch_size"][str(bs)] = row
    return res


# ------------------------------------------------------------------------------------------------------ main
def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "inf"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); returns the results written to ``--out``."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip's "initialized randomly" notice
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*initialized randomly")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            return _main(argv)
    finally:
        root.setLevel(level)


def _main(argv: Sequence[str] | None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000, help="JPEGs to score per pipeline on a GPU")
    ap.add_argument("--cpu-images", type=int, default=8, help="images without a GPU (the CPU dry run)")
    ap.add_argument("--model", default="open_clip:ViT-B-16/none")
    ap.add_argument("--batch-size", type=int, default=None, help="images per batch (default 512 on GPU, 8 on CPU)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader decoding workers of (a) (default: CPU "
                    "cores - 1 on a GPU machine, 0 without one)")
    ap.add_argument("--read-threads", type=int, default=8, help="file-reading threads of (b)")
    ap.add_argument("--classes", default=None, help="ID classes (default imagenet1k on GPU, cifar10 on CPU)")
    ap.add_argument("--lexicon", default=None, help="NegLabel lexicon: a selection name or comma-separated WordNet "
                    "files (default neglabel on GPU, a 487-word selection on CPU)")
    ap.add_argument("--ngroups", type=int, default=None, help="NegLabel groups (default 100 on GPU, 10 on CPU)")
    ap.add_argument("--text-batch-sizes", default="4096,1024,16384", help="lexicon timing batch sizes (first: cold)")
    ap.add_argument("--lexicon-limit", type=int, default=None, help="time only this many lexicon prompts (default "
                    "all 70,794 on GPU, 10,000 on CPU)")
    ap.add_argument("--out", default=None, help="write the results as JSON")
    ap.add_argument("--all-stages", action="store_true", help="without a GPU, still run every measurement on the "
                    "CPU (the warm-up, the lexicon's encoding per batch size, the projection): a dry run of the GPU "
                    "side's code; its figures are the CPU's")
    args = ap.parse_args(argv)
    import vlmood

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    n = args.images if cuda else min(args.images, args.cpu_images)
    bs = args.batch_size or (512 if cuda else 8)
    workers = args.workers if args.workers is not None else ((os.cpu_count() or 2) - 1 if cuda else 0)
    classes = args.classes or ("imagenet1k" if cuda else "cifar10")
    lexicon: Any = args.lexicon or ("neglabel" if cuda else ",".join(SMALL_LEXICON))
    lexicon = lexicon.split(",") if "," in lexicon else lexicon
    ngroups = args.ngroups or (100 if cuda else 10)
    lexicon_limit = args.lexicon_limit if args.lexicon_limit is not None or cuda else 10_000
    skipped: list[str] = []
    res: dict[str, Any] = {
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_cores": os.cpu_count(), "model": args.model, "images": n, "batch_size": bs, "workers": workers,
        "classes": classes, "lexicon": lexicon, "ngroups": ngroups}
    if not cuda and args.all_stages:
        skipped.append(f"no CUDA device: ran every stage on the CPU (--all-stages) on {n} images (of --images "
                       f"{args.images}; fp32, decode_jpeg on the CPU), with a small text side: every figure is this "
                       "CPU's; skipped: nvjpeg decoding, bf16 on the GPU, pinned host-to-device copies")
    elif not cuda:
        skipped.append(f"no CUDA device: ran the CPU side of both pipelines on {n} images (of --images "
                       f"{args.images}; fp32, decode_jpeg on the CPU, scores on the CPU), with a small text side; "
                       "skipped: nvjpeg decoding, bf16 on the GPU, throughput figures and the 90k projection, pinned "
                       "host-to-device copies, and the lexicon's GPU encoding (only its tokenisation is timed)")
    if skipped:
        print(skipped[0], flush=True)
    print(json.dumps({k: v for k, v in res.items()}), flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="vlmood-gpu-pipeline-")
    old_cache = os.environ.get("VLMOOD_CACHE")
    os.environ["VLMOOD_CACHE"] = os.path.join(tmp.name, "cache")  # cold text side, no feature cache
    try:
        t = time.perf_counter()
        folder = os.path.join(tmp.name, "jpegs")
        os.makedirs(folder)
        paths = make_jpegs(folder, n)
        res["data"] = {"seconds_to_write": time.perf_counter() - t,
                       "mean_kb": float(np.mean([os.path.getsize(p) for p in paths[:256]]) / 1024),
                       "sizes": sorted({f"{w}x{h}" for w, h in SIZES})}
        enc = vlmood.load_encoder(args.model, device=dev, precision="bf16" if cuda else None)
        res["precision"] = enc.precision
        plan = preprocess_plan(enc.preprocess)
        res["plan"] = {"resize": plan.size, "interpolation": plan.mode, "crop": plan.crop}

        # issue 12.4 first: the tokeniser must not have seen the lexicon yet (NegLabel's fit below encodes it)
        sizes = [int(s) for s in args.text_batch_sizes.split(",")]
        res["lexicon_encoding"] = lex = lexicon_timing(enc, sizes, lexicon_limit, full=cuda or args.all_stages)
        line = f"lexicon ({lex['prompts']:,} prompts, {lex['mean_tokens']:.1f} tokens each): tokenise " \
               f"{lex['tokenize_fresh_s']:.2f} s fresh, {lex['tokenize_warm_s']:.2f} s warm BPE cache"
        if "cold_s" in lex:
            line += (f"; compute_text_embeddings cold {lex['cold_s']:.2f} s (batch {lex['cold_batch_size']}, "
                     "target < 2 s)")
            for b, row in lex["per_batch_size"].items():
                line += f"; batch {b}: call {row['compute_text_embeddings_s']:.2f} s, tower alone " \
                        f"{row['tower_only_s']:.3f} s"
        else:
            skipped.append(lex["skipped"])
        print(line, flush=True)

        t = time.perf_counter()
        dets = build_detectors(enc, classes, lexicon, ngroups)
        res["text_side_s"] = time.perf_counter() - t
        res["negatives"] = len(dets["neglabel"].negatives_)
        print(f"text side (6 detectors, {len(dets['mcm'].classes)} classes, {res['negatives']} NegLabel negatives, "
              f"cold): {res['text_side_s']:.1f} s", flush=True)
        scorer = DeviceScorer(dets, dev)

        k = min(len(paths), 64 if cuda else 8)
        res["preprocess_check"] = pc = preprocess_check(enc, paths[:k], plan, dev)
        print(f"GPU-style preprocess vs PIL on {k} images ({pc['decoder']}): max {pc['max_levels']:.1f} / mean "
              f"{pc['mean_levels']:.3f} 8-bit levels, {100 * pc['share_of_values_differing']:.3f}% of values differ; "
              f"min feature cosine {pc['min_feature_cosine']:.6f}", flush=True)

        if cuda or args.all_stages:  # warm-up (kernels, cuBLAS, nvjpeg handles); DataLoader worker start-up stays in (a)'s time
            run_gpu_decode(enc, paths[: min(len(paths), bs)], plan, scorer, bs, args.read_threads, staged=False)
        a = run_cpu_decode(enc, paths, dets, bs, workers)
        b = run_gpu_decode(enc, paths, plan, scorer, bs, args.read_threads, staged=False)
        bst = run_gpu_decode(enc, paths, plan, scorer, bs, args.read_threads, staged=True)
        iso = stage_rates(enc, paths, bs, workers, args.read_threads)
        res["agreement_b_vs_a"] = agreement(a, b)
        res["staged_vs_end_to_end_max_score_diff"] = max(
            float(np.nanmax(np.abs(b["_scores"][k2] - bst["_scores"][k2]))) for k2 in b["_scores"])

        # device scoring alone on (a)'s features (the same features both ways: the scorer's own check)
        fa = a["_features"]
        g, loc = fa.features.to(dev), fa.local.to(dev)
        scorer(g[:bs], loc[:bs])
        _sync(dev)
        t = time.perf_counter()
        dev_scores: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(fa), bs):
            for name2, v in scorer(g[i : i + bs], loc[i : i + bs]).items():
                dev_scores.setdefault(name2, []).append(v)
        _sync(dev)
        dev_scoring_rate = len(fa) / (time.perf_counter() - t)
        res["device_scoring_vs_detectors_max_diff"] = {
            name2: float(np.nanmax(np.abs(torch.cat(v).cpu().numpy() - a["_scores"][name2])))
            for name2, v in dev_scores.items() if name2 != "pred"}
        del g, loc

        # (a)'s workers decode then resize each image: one stage of the pipeline, whose rate is the pair's
        rates_a = {"file read": iso["read"]["images_per_s"],
                   "PIL decode + resize/normalise (workers)": iso["pil_decode_and_preprocess"]["images_per_s"],
                   "image tower": iso["tower"]["images_per_s"], "scoring (detectors, CPU)": a["scoring_images_per_s"]}
        if "images_per_s" in iso["transfer"]:
            rates_a["transfer (pinned)"] = iso["transfer"]["images_per_s"]
        sr = bst["stages_images_per_s"]
        rates_b = {"file read": iso["read"]["images_per_s"], "decode (decode_jpeg)": sr["decode"],
                   "resize/normalise (tensors)": sr["preprocess"], "image tower": sr["tower"],
                   "scoring (on device)": sr["scoring"]}
        for key in ("_scores", "_pred", "_features"):
            for r in (a, b, bst):
                r.pop(key, None)
        res["cpu_decode"] = {**a, "stage_images_per_s": rates_a, "limited_by": limiting(rates_a),
                             "stages_isolated": iso}
        res["gpu_decode"] = {**b, "stage_images_per_s": rates_b, "limited_by": limiting(rates_b),
                             "staged_run": bst}
        res["device_scoring_images_per_s"] = dev_scoring_rate

        title = "images/s" if cuda else "images/s (CPU dry run: this CPU's rates, not a GPU's)"
        print(f"\n{title}\n{'':28s}{'(a) cpu-decode':>16s}{'(b) gpu-decode':>16s}")
        for label, va, vb in (("images/s end to end", a["images_per_s"], b["images_per_s"]),
                              ("file read", rates_a["file read"], rates_b["file read"]),
                              ("decode", iso["pil_decode"]["images_per_s"], rates_b["decode (decode_jpeg)"]),
                              ("resize/normalise", iso["pil_preprocess"]["images_per_s"],
                               rates_b["resize/normalise (tensors)"]),
                              ("transfer", rates_a.get("transfer (pinned)", math.nan), math.nan),
                              ("image tower", rates_a["image tower"], rates_b["image tower"]),
                              ("scoring", rates_a["scoring (detectors, CPU)"], rates_b["scoring (on device)"])):
            fa_, fb_ = (_fmt_rate(v) if not math.isnan(v) else "-" for v in (va, vb))
            print(f"{label:28s}{fa_:>16s}{fb_:>16s}")
        print(f"(a) workers {workers} (PIL rates: one process x {max(1, workers)}); (a) features alone "
              f"{_fmt_rate(a['features_images_per_s'])} images/s, then scoring on the CPU; on-device scoring of (a)'s "
              f"features: {_fmt_rate(dev_scoring_rate)} images/s")
        st = bst["stages_s"]
        print("(b) staged run (synchronised after each stage; file read not overlapped there): "
              + ", ".join(f"{k2} {100 * v / sum(st.values()):.0f}%" for k2, v in st.items())
              + "; its transfer is the compressed bytes, inside decode")
        print(f"limited by: (a) {res['cpu_decode']['limited_by']}; (b) {res['gpu_decode']['limited_by']}")
        ag = res["agreement_b_vs_a"]
        print(f"(b) vs (a) on the same {n} images: same class {100 * ag['same_class']:.2f}%; max score difference "
              + ", ".join(f"{k2} {v['max_score_diff']:.2g} (range {v['score_range']:.2g})"
                          for k2, v in ag.items() if k2 != "same_class"))
        print("on-device scores vs the detectors' score_features on the same features: max difference "
              + ", ".join(f"{k2} {v:.2g}" for k2, v in res["device_scoring_vs_detectors_max_diff"].items()))
        if cuda or args.all_stages:
            where = "" if cuda else " (this CPU, --all-stages: not a GPU figure)"
            res["projection_90k_s"] = proj = {"cpu_decode": PROJECT_IMAGES / a["images_per_s"],
                                              "gpu_decode": PROJECT_IMAGES / b["images_per_s"]}
            for name2, s in proj.items():
                verdict = "meets" if s < TARGET_S else "misses"
                print(f"projected for {PROJECT_IMAGES:,} images{where}, {name2}: {s:.1f} s ({verdict} the {TARGET_S:.0f} s "
                      f"target; text side once, cold: +{res['text_side_s']:.0f} s, ~0 when cached)")
    finally:
        if old_cache is None:
            os.environ.pop("VLMOOD_CACHE", None)
        else:
            os.environ["VLMOOD_CACHE"] = old_cache
        tmp.cleanup()
    res["skipped"] = skipped
    if skipped:
        print("\nSKIPPED: " + "\nSKIPPED: ".join(skipped))
        print(f"On a GPU machine run:\n    {GPU_COMMAND}")
    if args.out:
        from vlmood._io import atomic_write_bytes

        atomic_write_bytes(Path(args.out), (json.dumps(res, indent=1, default=str) + "\n").encode())
    return res


if __name__ == "__main__":
    main()
