"""``LVLMDetector``: OOD scores from a vision-language chat model, after ReGuide (Kim et al., ICLR 2025).

The model is asked to classify each image into the ID classes + ``"none of these classes"`` with a confidence
0-100 for every class (``prompts/lvlm/baseline.txt``); the score is ``S_max`` = the highest **ID-class** confidence
/ 100 (higher = more in-distribution, the convention of :mod:`vlmood.detectors`). ``prompt="reguide"`` first asks
the model for ``n_suggest`` visually similar and ``n_suggest`` dissimilar class names for the image that are not ID
classes (stage 1), then classifies over ID + suggested classes (stage 2): the suggestions are extra outlier classes
that draw confidence away from the ID classes, and ``S_max`` is still taken over the ID classes only.

Invalid responses (a parsed response whose ``valid`` is False, see :mod:`vlmood.lvlm.parser`, or a request that
failed) follow ``invalid``: ``"exclude"`` scores NaN (the :class:`~vlmood.evaluation.Benchmark` drops such images from that
detector's metrics and reports how many), ``"ood"`` scores 0 (the image is called OOD), ``"retry"`` asks again up to
``retries`` times (attempt ``k`` adds ``seed=k`` and uses ``retry_temperature``, so each attempt has its own cache
entry and can give another answer) and then excludes.

Class batches (``class_batch=B``): with many ID classes the model is asked about ``B`` classes at a time (the last
batch may be smaller), each prompt with its own ``"none of these classes"``. Combining rule: an image is valid only
when every batch's answer is valid; ``S_max`` = the maximum over batches of the batch's highest ID confidence;
``classify`` = the ID class with the highest confidence over all batches (ties: the first in class order); the
status of an invalid image is the first invalid batch's, of a valid one the status of the batch that gave ``S_max``.
With ReGuide, stage 1 lists all ID classes once per image and every stage-2 batch offers all the image's suggestions.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ..detectors.base import Prediction, _numeric_array, check_threshold
from ..errors import ImageLoadError, InvalidInputError
from ..metrics import threshold_at_tpr
from ..text.prompts import load_classes
from . import prompts as P
from .base import LVLMClient, Request

INVALID_RULES = ("exclude", "ood", "retry")
PROMPTS = ("baseline", "reguide")
ERROR_STATUS = "error"
"""Status of an image whose request failed (the client's error, e.g. the server rejected the image)."""
UNREADABLE_STATUS = "unreadable"
"""Status of an image that could not be decoded (never sent)."""


@dataclass
class _Unreadable:
    reason: str


def _invalid(status: str, reason: str) -> Any:
    from .parser import ParsedResponse

    return ParsedResponse(confidences={}, prediction=None, valid=False, status=status, reason=reason)


class LVLMDetector:
    """OOD detector over an :class:`~vlmood.lvlm.LVLMClient` (baseline or ReGuide prompting, ``S_max`` score).

    Args:
        client: any LVLM client (:class:`~vlmood.lvlm.OpenAIClient`, :class:`~vlmood.lvlm.TransformersClient`...).
        classes: ID class names (list, bundled list name, file, or comma-separated string).
        prompt: ``"baseline"`` or ``"reguide"`` (two stages).
        invalid: ``"exclude"`` (NaN score), ``"ood"`` (score 0) or ``"retry"`` (re-ask, then exclude).
        retries: re-asks per invalid image with ``invalid="retry"``.
        n_suggest: ReGuide stage 1 asks for this many similar and this many dissimilar outlier names.
        class_batch: ask about at most this many ID classes per prompt (None: all at once); see the module doc.
        retry_temperature: temperature of the re-asks (None keeps the first attempt's).
        chunk_size: images decoded and sent at a time (bounds memory; the client's concurrency works within it).
        progress: passed to ``generate_many``.
        **params: generation parameters passed to every ``generate_many`` call (``temperature``, ``max_tokens``...).

    After each call: ``responses_`` (one ``ParsedResponse`` per image, ReGuide: the stage-2 answer; classes outside
    the ID list are dropped from its confidences only for scoring), ``statuses_`` (count per status),
    ``suggestions_`` (ReGuide: the outlier names used per image), ``stage1_failed_`` (ReGuide: images whose stage 1
    failed or gave no usable name; their stage 2 runs over the ID classes only, as the baseline), ``attempts_``
    (asks per image). ``classify`` gives -1 for an invalid answer and for "none of these classes".
    """

    name = "lvlm"
    needs_images = True
    needs_local = False
    param_names = ("prompt", "invalid", "retries", "n_suggest", "class_batch", "retry_temperature", "chunk_size",
                   "generation")
    """The settings :meth:`get_params` returns and detector files record (``generation``: the ``**params``)."""

    def __init__(self, client: LVLMClient, classes: str | Sequence[str], prompt: str = "baseline",
                 invalid: str = "exclude", retries: int = 2, n_suggest: int = 5, class_batch: int | None = None,
                 retry_temperature: float | None = 0.7, chunk_size: int = 256, progress: bool | None = None,
                 **params: Any):
        if not hasattr(client, "generate_many"):
            raise InvalidInputError(f"client must be an LVLM client with generate_many, got {type(client).__name__}")
        if prompt not in PROMPTS:
            raise InvalidInputError(f"prompt must be 'baseline' or 'reguide', got {prompt!r}")
        if invalid not in INVALID_RULES:
            raise InvalidInputError(f"invalid must be 'exclude', 'ood' or 'retry', got {invalid!r}")
        for label, v, lo in (("retries", retries, 0), ("n_suggest", n_suggest, 1), ("chunk_size", chunk_size, 1),
                             ("class_batch", 1 if class_batch is None else class_batch, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InvalidInputError(f"{label} must be an integer >= {lo}, got {v!r}")
        self.client = client
        self.classes = load_classes(classes)
        P.baseline_prompt(self.classes)  # refuses names that would break the prompt, before any request
        self.prompt = prompt
        self.invalid = invalid
        self.retries = retries
        self.n_suggest = n_suggest
        self.class_batch = class_batch
        self.retry_temperature = retry_temperature
        self.chunk_size = chunk_size
        self.progress = progress
        self.params = params
        self.threshold_: float | None = None
        self.tpr_: float | None = None
        self.responses_: list[Any] = []
        self.statuses_: dict[str, int] = {}
        self.suggestions_: list[list[str]] = []
        self.stage1_failed_ = 0
        self._stage1_failed = 0
        self.attempts_: list[int] = []
        self._index = {c: i for i, c in enumerate(self.classes)}

    def __repr__(self) -> str:
        batch = f", batches of {self.class_batch}" if self.class_batch else ""
        return (f"LVLMDetector({len(self.classes)} classes, {self.prompt} prompt, invalid={self.invalid}{batch}, "
                f"{getattr(self.client, 'model_id', type(self.client).__name__)})")

    def get_params(self) -> dict[str, Any]:
        """The detector's settings as ``__init__`` takes them; ``generation`` holds the generation ``**params``."""
        return {**{k: getattr(self, k) for k in self.param_names[:-1]}, "generation": dict(self.params)}

    def save(self, path: Any) -> Any:
        """Write the detector (settings, classes, calibration, the client's configuration, never an API key) as a
        ``vlmood.detector`` file; :func:`vlmood.load_detector` rebuilds the client from it (see
        :func:`client_config`). Returns the path written."""
        from ..detectors.persist import save_detector

        return save_detector(self, path)

    # ------------------------------------------------------------------ asking
    def _batches(self) -> list[list[str]]:
        b = self.class_batch or len(self.classes)
        return [self.classes[i : i + b] for i in range(0, len(self.classes), b)]

    def _params(self, attempt: int) -> dict[str, Any]:
        if attempt == 0:
            return dict(self.params)
        extra = {"seed": attempt}
        if self.retry_temperature is not None:
            extra["temperature"] = self.retry_temperature
        return {**self.params, **extra}

    def _generate(self, requests: list[Request], attempt: int) -> list[Any]:
        if not requests:
            return []
        replies = self.client.generate_many(requests, progress=self.progress, **self._params(attempt))
        if len(replies) != len(requests):
            raise InvalidInputError(f"the LVLM client returned {len(replies)} replies for {len(requests)} requests")
        return replies

    def _parse(self, reply: Any, classes: list[str]) -> Any:
        if reply.text is None:
            return _invalid(ERROR_STATUS, reply.error or "request failed")
        from .parser import parse_response

        p = parse_response(reply.text, classes + [P.NONE_CLASS])
        return self._cut(p) if getattr(reply, "truncated", False) and p.valid else p

    def _cut(self, p: Any) -> Any:
        """A parsed answer that stopped at the token limit: its last confidence may itself be cut ("9" of "95"),
        so it is dropped, and the answer stays valid only when what is left decides ``S_max`` (a kept ID
        confidence of 100, or the stated prediction's kept confidence being the highest), as the parser's rule for
        visibly cut answers."""
        from .parser import ParsedResponse

        conf = dict(p.confidences)
        if conf:
            conf.pop(list(conf)[-1])
        ids = {c: v for c, v in conf.items() if c in self._index}
        best = max(ids.values()) if ids else None
        decided = bool(ids) and (best >= 100.0 or (p.prediction in ids and ids[p.prediction] == best))
        return ParsedResponse(confidences=conf, prediction=p.prediction, valid=decided, status="truncated",
                              reason=f"the reply stopped at the token limit (dropped its last entry); "
                                     f"{'what is left decides S_max' if decided else 'S_max is undecided'}")

    def _suggest(self, images: list[Any]) -> list[list[str]]:
        prompt = P.reguide_stage1(self.classes, self.n_suggest)
        idx = [i for i, im in enumerate(images) if not isinstance(im, _Unreadable)]
        replies = self._generate([Request(prompt, images[i]) for i in idx], 0)
        out: list[list[str]] = [[] for _ in images]
        failed = 0
        for i, r in zip(idx, replies):
            out[i] = P.parse_suggestions(r.text, self.classes, self.n_suggest)
            failed += not out[i]  # a failed request, a refusal, no usable name: stage 2 runs without suggestions
        self._stage1_failed += failed
        return out

    def _ask(self, images: list[Any], suggestions: list[list[str]]) -> tuple[list[Any], list[int]]:
        """Per image: the combined parsed response over the class batches (after retries) and the number of asks."""
        batches = self._batches()
        n = len(images)
        parsed: list[list[Any]] = [[None] * len(batches) for _ in range(n)]
        asks = [0] * n
        for i, im in enumerate(images):
            if isinstance(im, _Unreadable):
                parsed[i] = [_invalid(UNREADABLE_STATUS, im.reason)] * len(batches)
        todo = [(i, b) for i in range(n) for b in range(len(batches)) if not isinstance(images[i], _Unreadable)]
        attempt = 0
        while todo:
            cands = [P.stage2_classes(batches[b], suggestions[i]) if self.prompt == "reguide" else batches[b]
                     for i, b in todo]
            reqs = [Request(P.reguide_stage2(batches[b], suggestions[i]) if self.prompt == "reguide"
                            else P.baseline_prompt(batches[b]), images[i]) for i, b in todo]
            for (i, b), c, reply in zip(todo, cands, self._generate(reqs, attempt)):
                parsed[i][b] = self._parse(reply, c)
            for i in {i for i, _ in todo}:
                asks[i] += 1
            attempt += 1
            if self.invalid != "retry" or attempt > self.retries:
                break
            todo = [(i, b) for i, b in todo if not parsed[i][b].valid]
        return [self._combine(p) for p in parsed], asks

    def _combine(self, batches: list[Any]) -> Any:
        """One response from the batches' (see the module doc for the rule)."""
        if len(batches) == 1:
            return batches[0]
        bad = [p for p in batches if not p.valid]
        if bad:
            return bad[0]
        from .parser import ParsedResponse

        best = max(range(len(batches)), key=lambda b: (self._smax(batches[b]), -b))
        conf: dict[str, float] = {}
        for p in batches:
            conf.update({c: v for c, v in p.confidences.items() if c in self._index})
        pred = max(conf, key=lambda c: (conf[c], -self._index[c])) if conf else None
        return ParsedResponse(confidences=conf, prediction=pred, valid=True, status=batches[best].status,
                              reason=batches[best].reason)

    def _smax(self, p: Any) -> float:
        vals = [v for c, v in p.confidences.items() if c in self._index]
        return max(vals) / 100.0 if vals else 0.0

    def _label(self, p: Any) -> int:
        conf = {c: v for c, v in p.confidences.items() if c in self._index}
        if not p.valid or not conf or max(conf.values()) <= 0 or p.status == "none_of_these":
            return -1  # no ID class: an invalid answer, or "none of these classes"
        return self._index[max(conf, key=lambda c: (conf[c], -self._index[c]))]

    def _load(self, images: Any) -> Any:
        from ..data import as_source

        return as_source(images)

    def respond(self, images: Any) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [N], labels [N])`` in one pass over the model (labels: ID class index, -1 when invalid);
        sets ``responses_``, ``statuses_``, ``suggestions_`` and ``attempts_``.

        ``images``: anything :func:`vlmood.data.as_source` accepts (paths, a folder, a glob, a manifest, PIL images,
        an ``ImageSource``). An image that cannot be decoded is not sent: status ``"unreadable"``, invalid.
        """
        src = self._load(images)
        self._stage1_failed = 0
        responses: list[Any] = []
        suggestions: list[list[str]] = []
        attempts: list[int] = []
        for start in range(0, len(src), self.chunk_size):
            chunk: list[Any] = []
            for i in range(start, min(len(src), start + self.chunk_size)):
                try:
                    chunk.append(src.load(i))
                except ImageLoadError as e:
                    chunk.append(_Unreadable(str(e)))
            sugg = self._suggest(chunk) if self.prompt == "reguide" else [[] for _ in chunk]
            resp, asks = self._ask(chunk, sugg)
            responses += resp
            suggestions += sugg
            attempts += asks
        self.responses_, self.suggestions_, self.attempts_ = responses, suggestions, attempts
        self.statuses_ = dict(Counter(p.status for p in responses))
        self.stage1_failed_ = self._stage1_failed  # ReGuide: images whose stage 1 gave no usable outlier name
        scores = np.array([self._smax(p) if p.valid else (0.0 if self.invalid == "ood" else math.nan)
                           for p in responses], dtype=np.float64)
        labels = np.array([self._label(p) for p in responses], dtype=np.int64)
        return scores, labels

    @property
    def n_invalid_(self) -> int:
        """Images of the last call whose final response was invalid."""
        return sum(not p.valid for p in self.responses_)

    # ------------------------------------------------------------------ detector API
    def score(self, images: Any) -> np.ndarray:
        """``S_max`` per image ``[N]`` (higher = more ID); invalid: NaN (exclude, retry) or 0 (ood)."""
        return self.respond(images)[0]

    def classify(self, images: Any) -> np.ndarray:
        """Index of the ID class with the highest confidence per image ``[N]``; -1 when the response is invalid."""
        return self.respond(images)[1]

    def calibrate(self, id_scores_or_images: Any, tpr: float = 0.95) -> float:
        """Set ``threshold_`` to the highest value keeping a ``tpr`` fraction of ID inputs (and ``tpr_`` to ``tpr``);
        returns it.

        Accepts 1-D ID scores (NaN refused, as for every detector) or ID images: their excluded (NaN) scores are
        left out, and a one-line error is raised when no image has a valid response.
        """
        arr = _numeric_array(id_scores_or_images)
        if arr is not None:
            if arr.ndim != 1:
                raise InvalidInputError(f"calibrate expects 1-D ID scores [N] or ID images; got an array of shape "
                                        f"{arr.shape}")
            scores = arr
        else:
            scores = self.score(id_scores_or_images)
            scores = scores[np.isfinite(scores)]
            if not scores.size:
                raise InvalidInputError(f"no ID image got a valid response ({self.statuses_}); cannot calibrate")
        self.threshold_ = threshold_at_tpr(scores, tpr)
        self.tpr_ = float(tpr)
        return self.threshold_

    def predict(self, images: Any, threshold: float | None = None) -> Prediction:
        """Class, score and OOD decision (``not score >= threshold``: an excluded, NaN score is OOD) per image;
        ``class_names`` is None where the response was invalid."""
        thr = self.threshold_ if threshold is None else threshold
        if thr is None:
            raise InvalidInputError("no threshold: call calibrate(id_scores_or_images) first or pass threshold=")
        thr = check_threshold(thr)
        scores, labels = self.respond(images)
        names = [self.classes[i] if i >= 0 else None for i in labels]
        return Prediction(labels, names, scores, ~(np.isfinite(scores) & (scores >= thr)))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- detector files
_OPENAI_KEYS = ("base_url", "model", "temperature", "max_tokens", "timeout", "max_retries", "backoff", "concurrency",
                "max_backoff", "max_retry_after", "jitter")
_HF_KEYS = ("model", "batch_size", "max_new_tokens", "temperature")


def client_config(client: Any) -> dict[str, Any]:
    """How a detector file records ``client``: ``{"client": "openai", base URL, model, retries, ...}``, ``{"client":
    "transformers", model folder or hub id, ...}``, or ``{"client": "custom", "type": ...}`` for any other client
    (then ``vlmood.load_detector(..., client=...)`` must give one). Always ``model_id`` and ``cache`` (whether the
    response cache was on). Never the API key."""
    import sys

    from .http import OpenAIClient

    hf = sys.modules.get("vlmood.lvlm.hf")  # never imported just to look
    common = {"model_id": str(getattr(client, "model_id", "")), "cache": getattr(client, "cache", None) is not None}
    if isinstance(client, OpenAIClient):
        return {"client": "openai", **{k: getattr(client, k) for k in _OPENAI_KEYS}, **common}
    model = getattr(getattr(client, "model", None), "name_or_path", "") if hf is not None else ""
    if hf is not None and isinstance(client, hf.TransformersClient) and model:
        if not os.path.isabs(str(model)) and os.path.isdir(str(model)):  # a local folder: loads from anywhere
            model = os.path.abspath(str(model))
        return {"client": "transformers", "model": str(model), "batch_size": client.batch_size,
                "max_new_tokens": client.params.max_tokens, "temperature": client.params.temperature, **common}
    return {"client": "custom", "type": type(client).__name__, **common}


def check_client_config(cfg: Any) -> str | None:
    """Why ``cfg`` is not a recorded client configuration (:func:`client_config`), or None."""
    kinds = {"openai": _OPENAI_KEYS, "transformers": _HF_KEYS, "custom": ("type",)}
    if not isinstance(cfg, dict) or cfg.get("client") not in kinds:
        return 'expected {"client": "openai" | "transformers" | "custom", ...}'
    want = {"client", "model_id", "cache", *kinds[cfg["client"]]}
    if set(cfg) != want:
        return f"expected exactly {', '.join(sorted(want))}, got {', '.join(sorted(cfg))}"
    if not isinstance(cfg["model_id"], str) or not isinstance(cfg["cache"], bool):
        return "model_id must be a string and cache true or false"
    return None


def build_client(cfg: dict[str, Any], client: Any, device: Any, cache: Any, name: str) -> Any:
    """The client of a detector file: ``client`` when given (a warning when its ``model_id`` is not the recorded
    one), else rebuilt from ``cfg`` (the API key of an OpenAI-compatible client comes from the environment)."""
    import warnings

    if client is None:
        kind = cfg["client"]
        if kind == "custom":
            raise InvalidInputError(f"{name} was saved with a custom LVLM client ({cfg['type']}, model "
                                    f"{cfg['model_id']!r}) that cannot be rebuilt: pass client= to load_detector")
        use_cache = cache is not False and cache is not None and cfg["cache"]  # the default response cache
        if kind == "openai":
            from .http import OpenAIClient

            client = OpenAIClient(**{k: cfg[k] for k in _OPENAI_KEYS}, cache=use_cache)
        else:
            from .hf import TransformersClient

            client = TransformersClient(cfg["model"], device=device, batch_size=cfg["batch_size"],
                                        max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"],
                                        cache=use_cache)
    model_id = getattr(client, "model_id", None)
    if cfg["model_id"] and model_id != cfg["model_id"]:
        warnings.warn(f"{name} was saved with the LVLM {cfg['model_id']!r} but is loaded with {model_id!r}",
                      stacklevel=3)
    return client
