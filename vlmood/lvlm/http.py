"""OpenAI-compatible chat-completions client (vLLM, Ollama, llama.cpp's server, LM Studio, SGLang...), on httpx.

Install with ``pip install -e ".[lvlm]"``. Each request is one user turn: the prompt's text and the image as a
base64 data URL (PNG for a PIL image; a file's or bytes' own encoding otherwise). Failures are handled so a long
run goes on:

- connection errors, timeouts, 429 and 5xx are retried up to ``max_retries`` times with exponential backoff
  (``backoff * 2**k`` seconds, capped at ``max_backoff``, times ``1 + jitter * u`` with ``u`` from a seeded RNG),
  or after the server's ``Retry-After`` (seconds or an HTTP date, capped at ``max_retry_after``);
- any other 4xx (an image the server rejects, a bad parameter) is not retried: that request's
  :class:`~vlmood.lvlm.base.Reply` carries the server's message (one line), the other requests go on;
- an unreachable server or a model it does not serve is reported by :meth:`OpenAIClient.check` (run once by
  ``generate_many`` before any image is read) as one :class:`~vlmood.errors.VlmoodError` line naming the URL.

Up to ``concurrency`` requests are in flight at once (a thread pool over one connection pool). Replies are read
from / written to a :class:`~vlmood.lvlm.cache.ResponseCache` (each success as soon as it arrives), so an
interrupted run resumes where it stopped. The API key (argument, else ``$VLMOOD_LVLM_API_KEY``, else
``$OPENAI_API_KEY``) is sent as a Bearer token only: it is never logged, never part of a cache key, and is masked
in any error text a server echoes it in.
"""
from __future__ import annotations

import base64
import email.utils
import io
import json
import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Sequence

from .._io import printable
from ..errors import InvalidInputError, ServiceError, VlmoodError
from .base import GenerationParams, LVLMClient, Messages, Reply, Request
from .cache import ResponseCache, image_hash

log = logging.getLogger("vlmood.lvlm")

API_KEY_ENV = ("VLMOOD_LVLM_API_KEY", "OPENAI_API_KEY")
"""Environment variables read (in this order) for the API key when none is given."""


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise VlmoodError('the OpenAI-compatible LVLM client needs httpx: pip install "vlmood[lvlm]"') from None
    return httpx


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or
    unreadable. A date in the past gives 0."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mime_of(data: bytes) -> str | None:
    """The image MIME type of encoded bytes (PIL identifies the format), or None when it is not an image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return Image.MIME.get(im.format or "")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None


def image_data_url(image: Any) -> str:
    """``data:<mime>;base64,...`` of a PIL image (PNG), a file path or encoded bytes (their own format).
    Raises :class:`~vlmood.errors.InvalidInputError` (one line) for an unreadable file or bytes that are not an
    image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        im = image if image.mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I") else image.convert("RGB")
        im.save(buf, format="PNG")
        data, mime, name = buf.getvalue(), "image/png", "PIL image"
    elif isinstance(image, (bytes, bytearray, memoryview)):
        data, name = bytes(image), "image bytes"
        mime = _mime_of(data)
    elif isinstance(image, (str, os.PathLike)):
        name = printable(os.fsdecode(image))
        try:
            with open(image, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InvalidInputError(f"cannot read image {name}: {e.strerror or e}") from None
        mime = _mime_of(data)
    else:
        raise InvalidInputError(f"an LVLM image must be a PIL image, a file path or encoded bytes, not "
                                f"{type(image).__name__}")
    if mime is None:
        raise InvalidInputError(f"{name} is not an image (unrecognised format)")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def build_messages(prompt: Messages, image_url: str | None) -> list[dict]:
    """Chat messages for ``prompt`` (a string: one user turn) with the image put before the text of the last user
    turn. Raises :class:`~vlmood.errors.InvalidInputError` for malformed messages."""
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in prompt):
        messages = [dict(m) for m in prompt]
    else:
        raise InvalidInputError("an LVLM prompt must be a string or a non-empty list of chat messages "
                                '{"role": ..., "content": ...}')
    if image_url is None:
        return messages
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise InvalidInputError("chat messages with an image need a user turn to attach it to")
    m = messages[users[-1]]
    parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else list(m["content"])
    m["content"] = [{"type": "image_url", "image_url": {"url": image_url}}, *parts]
    return messages


def _reply_text(body: Any) -> str:
    """The assistant's text of a chat-completion body; raises ValueError when it has none."""
    if isinstance(body, dict) and "choices" not in body and isinstance(body.get("error"), (dict, str)):
        err = body["error"]
        raise ValueError(err.get("message", err) if isinstance(err, dict) else err)
    try:
        content = body["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError("the reply has no choices[0].message") from None
    if content is None:
        return ""
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _finish_reason(body: Any) -> str | None:
    """``choices[0].finish_reason`` of a chat-completion body (``"length"``: cut by the token limit), or None."""
    try:
        return body["choices"][0].get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None


def _server_message(resp: Any) -> str:
    """The error message of an error response (OpenAI's ``{"error": {"message": ...}}``, ``{"detail": ...}``,
    ``{"message": ...}`` or the body's text)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text or resp.reason_phrase
    if isinstance(body, dict):
        for k in ("error", "detail", "message"):
            v = body.get(k)
            if isinstance(v, dict) and "message" in v:
                return str(v["message"])
            if isinstance(v, str) and v:
                return v
    return json.dumps(body)


class _Stop(Exception):
    """The run was interrupted: pending requests give up."""


class OpenAIClient(LVLMClient):
    """An OpenAI-compatible chat-completions server at ``base_url`` (e.g. ``http://localhost:8000/v1``) serving
    ``model``. See the module docstring for retries, concurrency and caching. ``cache``: True (the default
    cache), False/None (none), a folder, or a :class:`ResponseCache`."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, temperature: float = 0.0,
                 max_tokens: int = 512, timeout: float = 60.0, max_retries: int = 5, backoff: float = 0.5,
                 concurrency: int = 16, cache: bool | str | os.PathLike | ResponseCache | None = True,
                 max_backoff: float = 30.0, max_retry_after: float = 60.0, jitter: float = 0.1, seed: int = 0):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidInputError(f"LVLM base URL must start with http:// or https://, got {base_url!r}")
        if not isinstance(model, str) or not model.strip():
            raise InvalidInputError("LVLM model name is empty")
        for name, v, lo in (("concurrency", concurrency, 1), ("max_retries", max_retries, 0),
                            ("max_tokens", max_tokens, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise InvalidInputError(f"LVLM {name} must be an integer >= {lo}, got {v!r}")
        for name, v in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff),
                        ("max_retry_after", max_retry_after), ("jitter", jitter), ("temperature", temperature)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0 or v == float("inf"):
                raise InvalidInputError(f"LVLM {name} must be a finite number >= 0, got {v!r}")
        if timeout <= 0:
            raise InvalidInputError(f"LVLM timeout must be > 0 seconds, got {timeout!r}")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.model_id = f"{self.base_url}|{model}"
        self._api_key = api_key or next((os.environ[k] for k in API_KEY_ENV if os.environ.get(k)), None)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_retry_after = float(max_retry_after)
        self.jitter = float(jitter)
        self.concurrency = concurrency
        if cache is True:
            self.cache: ResponseCache | None = ResponseCache()
        elif cache is False or cache is None:
            self.cache = None
        elif isinstance(cache, ResponseCache):
            self.cache = cache
        else:
            self.cache = ResponseCache(cache)
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._http: Any = None
        self._http_lock = threading.Lock()
        self._checked = False

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIClient({self.base_url!r}, {self.model!r}, concurrency={self.concurrency})"

    # ------------------------------------------------------------------------------------------ plumbing
    def _client(self) -> Any:
        with self._http_lock:
            if self._http is None:
                httpx = _httpx()
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                self._http = httpx.Client(
                    headers=headers, timeout=httpx.Timeout(self.timeout),
                    limits=httpx.Limits(max_connections=self.concurrency,
                                        max_keepalive_connections=self.concurrency))
            return self._http

    def close(self) -> None:
        """Close the connection pool (a later request opens a new one)."""
        with self._http_lock:
            if self._http is not None:
                self._http.close()
                self._http = None

    def __enter__(self) -> "OpenAIClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _mask(self, text: str) -> str:
        """``text`` with the API key masked (servers may echo it in an error message)."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        with self._rng_lock:
            u = self._rng.random()
        return min(self.backoff * 2 ** (attempt - 1), self.max_backoff) * (1 + self.jitter * u)

    # ------------------------------------------------------------------------------------------ check
    def check(self) -> list[str]:
        """Make sure the server answers and serves :attr:`model` (``GET {base_url}/models``, one try); returns
        the served model names (empty when the server has no model listing). Raises
        :class:`~vlmood.errors.VlmoodError` with one line naming the URL otherwise."""
        httpx = _httpx()
        url = f"{self.base_url}/models"
        try:
            resp = self._client().get(url, timeout=min(self.timeout, 10.0))
        except httpx.TimeoutException:
            raise ServiceError(f"LVLM server at {self.base_url} did not answer GET {url} within "
                              f"{min(self.timeout, 10.0):g} s") from None
        except httpx.HTTPError as e:
            raise ServiceError(f"cannot reach the LVLM server at {self.base_url} ({type(e).__name__}: "
                              f"{self._mask(_one_line(str(e) or 'no detail'))}); is it running?") from None
        if resp.status_code in (404, 405, 501):  # a server without a model listing: the first request will tell
            self._checked = True
            return []
        if resp.status_code != 200:
            raise ServiceError(f"LVLM server at {self.base_url} answered GET {url} with HTTP {resp.status_code}: "
                              f"{self._mask(_one_line(_server_message(resp)))}")
        try:
            served = [str(m["id"]) for m in resp.json()["data"]]
        except (ValueError, KeyError, TypeError):
            raise ServiceError(f"LVLM server at {self.base_url} answered GET {url} with something other than a "
                              "model list; is it an OpenAI-compatible server?") from None
        if self.model not in served and f"{self.model}:latest" not in served:
            raise VlmoodError(f"LVLM server at {self.base_url} does not serve model {self.model!r}; it serves: "
                              f"{', '.join(served) or '(nothing)'}")
        self._checked = True
        return served

    # ------------------------------------------------------------------------------------------ requests
    def _post(self, body: dict, stop: threading.Event) -> Reply:
        """One chat request with retries; never raises except :class:`_Stop` when ``stop`` is set."""
        httpx = _httpx()
        url = f"{self.base_url}/chat/completions"
        attempt = 0
        while True:
            if stop.is_set():
                raise _Stop
            attempt += 1
            retry_after = None
            try:
                resp = self._client().post(url, json=body)
            except httpx.TimeoutException:
                error, retry = f"no answer from {url} within {self.timeout:g} s", True
            except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
                detail = _one_line(str(e) or "no detail")
                error, retry = f"connection to {url} failed ({type(e).__name__}: {detail})", True
            except httpx.HTTPError as e:
                error, retry = f"request to {url} failed ({type(e).__name__}: {_one_line(str(e))})", False
            else:
                if resp.status_code == 200:
                    try:
                        body = resp.json()
                        return Reply(_reply_text(body), attempts=attempt, truncated=_finish_reason(body) == "length")
                    except ValueError as e:
                        return Reply(None, self._mask(f"unreadable reply from {url}: {_one_line(str(e))}"),
                                     attempts=attempt)
                error = f"HTTP {resp.status_code} from {url}: {_one_line(_server_message(resp))}"
                retry = resp.status_code == 429 or resp.status_code >= 500
                retry_after = retry_after_seconds(resp.headers.get("Retry-After")) if retry else None
            error = self._mask(error)
            if not retry or attempt > self.max_retries:
                if retry:
                    error += f" (gave up after {attempt} attempts)"
                return Reply(None, error, attempts=attempt)
            delay = self._delay(attempt, retry_after)
            log.debug("LVLM request failed (%s); retry %d/%d in %.2f s", error, attempt, self.max_retries, delay)
            if stop.wait(delay):
                raise _Stop

    def _params(self, params: dict[str, Any]) -> GenerationParams:
        params = dict(params)
        return GenerationParams(temperature=float(params.pop("temperature", self.temperature)),
                                max_tokens=int(params.pop("max_tokens", self.max_tokens)), extra=params)

    def generate_many(self, requests: Sequence[Request], progress: bool | None = None,
                      **params: Any) -> list[Reply]:
        """Replies in request order: cached ones first (``cached=True``, ``attempts=0``), then the others with up
        to :attr:`concurrency` in flight, each success stored in the cache as soon as it arrives. :meth:`check`
        runs once per client before anything else (an unreachable server raises one
        :class:`~vlmood.errors.VlmoodError` before any image is read). Extra ``params`` (``temperature``,
        ``max_tokens``, any server option such as ``top_p``) go into the request body and the cache key."""
        gen = self._params(params)
        if requests and not self._checked:
            self.check()  # an unreachable server fails here, before any image is read
        replies: list[Reply | None] = [None] * len(requests)
        todo: list[tuple[int, Request, str | None]] = []
        for i, r in enumerate(requests):
            if not isinstance(r, Request):
                raise InvalidInputError(f"generate_many expects Request objects, got {type(r).__name__} at {i}")
            build_messages(r.prompt, None)  # malformed prompts are a usage error: raise now
            try:
                key = (self.cache.key(self.model_id, r.prompt, image_hash(r.image), gen.key())
                       if self.cache is not None else None)
            except OSError as e:
                replies[i] = Reply(None, f"cannot read image {printable(os.fsdecode(r.image))}: {e.strerror or e}")
                continue
            hit = self.cache.get_entry(key) if key is not None else None
            if hit is not None:
                replies[i] = Reply(hit[0], cached=True, attempts=0, truncated=hit[1])
            else:
                todo.append((i, r, key))
        if todo:
            self._run(todo, replies, gen, progress)
        return replies  # type: ignore[return-value]

    def _one(self, r: Request, key: str | None, gen: GenerationParams, stop: threading.Event) -> Reply:
        try:
            url = image_data_url(r.image) if r.image is not None else None
        except InvalidInputError as e:
            return Reply(None, str(e))
        body = {"model": self.model, "messages": build_messages(r.prompt, url), "temperature": gen.temperature,
                "max_tokens": gen.max_tokens, **gen.extra}
        reply = self._post(body, stop)
        if reply.text is not None and key is not None and self.cache is not None:
            self.cache.put(key, reply.text, reply.truncated)  # at once: an interrupted run resumes from here
        return reply

    def _run(self, todo: list[tuple[int, Request, str | None]], replies: list[Reply | None],
             gen: GenerationParams, progress: bool | None) -> None:
        from .._progress import progress as _progress

        stop = threading.Event()
        bar = _progress(len(todo), "LVLM requests", "requests", progress,
                        start=f"sending {len(todo):,} requests to {self.model}")
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(todo)), thread_name_prefix="lvlm")
        try:
            futures: dict[Future, int] = {pool.submit(self._one, r, key, gen, stop): i for i, r, key in todo}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    replies[futures[f]] = f.result()
                    bar.update(1)
        except BaseException:
            stop.set()  # an interrupt or a bug: pending requests give up, finished ones are cached
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
