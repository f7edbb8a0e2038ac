"""A loopback OpenAI-compatible chat-completions server for the LVLM tests, notebook and benchmarks.

Bound to 127.0.0.1 on a free port, one thread per connection. ``POST /v1/chat/completions`` answers with a
scripted reply; ``GET /v1/models`` lists the served models. Usage::

    from tests.lvlm_server import LoopbackServer, Behaviour, request_image

    with LoopbackServer(lambda req: "Prediction: cat") as server:
        client = OpenAIClient(server.base_url, server.models[0])
        ...
        server.requests, server.max_in_flight

(or ``sys.path.insert(0, "tests"); from lvlm_server import ...``). The ``script`` gets the request's JSON body
and returns the reply text, or a :class:`Behaviour` (:func:`slow`, :func:`rate_limited`, :func:`server_error`,
:func:`drop`, :func:`reject`, ...). ``latency`` delays every chat reply by that many seconds. A request naming a
model that is not served gets OpenAI's 404 ``model_not_found`` error. Counters: ``requests`` (chat POSTs),
``model_listings`` (GETs of /models), ``in_flight``, ``max_in_flight``; ``bodies`` keeps every chat request body
``headers`` their headers, and ``script_errors`` the
exceptions the script raised (each answered with a 500).
"""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Sequence


@dataclass
class Behaviour:
    """A scripted non-standard answer: ``status`` with a JSON ``body`` (or ``text`` as a normal completion),
    extra ``headers``, a ``delay`` in seconds before answering, or ``drop`` (close the connection unanswered)."""

    status: int = 200
    text: str | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop: bool = False
    finish_reason: str = "stop"


def reply(text: str, finish_reason: str = "stop") -> Behaviour:
    """A normal completion with ``text`` (``finish_reason="length"`` for a reply cut by the token limit)."""
    return Behaviour(text=text, finish_reason=finish_reason)


def slow(seconds: float, text: str = "slow reply") -> Behaviour:
    """Answer ``text`` after ``seconds`` (past a client's timeout: the client gives up first)."""
    return Behaviour(text=text, delay=seconds)


def openai_error(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def rate_limited(retry_after: str | float | None = "1") -> Behaviour:
    """429 Too Many Requests with ``Retry-After`` (seconds or an HTTP date; None: no header)."""
    headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
    return Behaviour(status=429, body=openai_error("Rate limit reached", "rate_limit_error", "rate_limit_exceeded"),
                     headers=headers)


def server_error(status: int = 500, message: str = "internal server error") -> Behaviour:
    """A 5xx error with an OpenAI-style body."""
    return Behaviour(status=status, body=openai_error(message, "server_error"))


def drop() -> Behaviour:
    """Close the connection without any response."""
    return Behaviour(drop=True)


def reject(message: str = "Invalid image: cannot identify image file", status: int = 400) -> Behaviour:
    """A client error (the server refuses this request, e.g. its image) with an OpenAI-style body."""
    return Behaviour(status=status, body=openai_error(message))


def sequence(*items: str | Behaviour) -> Callable[[dict], str | Behaviour]:
    """A script answering ``items`` in turn, then repeating the last one (thread-safe; use with concurrency 1 when
    the order of requests matters)."""
    lock = threading.Lock()
    state = {"i": 0}

    def script(_req: dict) -> str | Behaviour:
        with lock:
            i = min(state["i"], len(items) - 1)
            state["i"] += 1
        return items[i]

    return script


def request_text(req: dict) -> str:
    """All text parts of a chat request's messages, joined by newlines."""
    out = []
    for m in req.get("messages", []):
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        elif isinstance(c, list):
            out += [p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"]
    return "\n".join(out)


def request_image_bytes(req: dict) -> tuple[str, bytes] | None:
    """(mime type, bytes) of the first data-URL image of a chat request, or None."""
    for m in req.get("messages", []):
        c = m.get("content")
        if isinstance(c, list):
            for p in c:
                if isinstance(p, dict) and p.get("type") == "image_url":
                    url = p["image_url"]["url"]
                    head, _, data = url.partition(",")
                    return head[len("data:"):].split(";")[0], base64.b64decode(data)
    return None


def request_image(req: dict):
    """The first image of a chat request as a PIL image (RGB), or None."""
    found = request_image_bytes(req)
    if found is None:
        return None
    from PIL import Image

    return Image.open(io.BytesIO(found[1])).convert("RGB")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        if self.path.rstrip("/") != "/v1/models":
            self._send_json(404, openai_error(f"no route {self.path}"))
            return
        with owner._lock:
            owner.model_listings += 1
        self._send_json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "loopback"} for m in owner.models]})

    def do_POST(self) -> None:  # noqa: N802
        owner = self.server.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        with owner._lock:
            owner.requests += 1
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
            owner.headers.append(dict(self.headers))
        try:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send_json(404, openai_error(f"no route {self.path}"))
                return
            req = json.loads(raw)
            with owner._lock:
                owner.bodies.append(req)
            model = req.get("model")
            if model not in owner.models:
                self._send_json(404, openai_error(f"The model `{model}` does not exist.", code="model_not_found"))
                return
            try:
                out = owner.script(req)
            except Exception as e:  # a bug in the test's script: a clear 500, recorded in ``script_errors``
                with owner._lock:
                    owner.script_errors.append(repr(e))
                self._send_json(500, openai_error(f"loopback script raised {e!r}", "server_error"))
                return
            b = out if isinstance(out, Behaviour) else Behaviour(text=str(out))
            wait = owner.latency + b.delay
            if wait > 0 and owner._stop.wait(wait):
                return  # shutting down
            if b.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if b.text is not None and b.status == 200:
                body = {"id": "chatcmpl-loopback", "object": "chat.completion", "created": int(time.time()),
                        "model": model, "choices": [{"index": 0, "finish_reason": b.finish_reason,
                                                     "message": {"role": "assistant", "content": b.text}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                self._send_json(200, body, b.headers)
            else:
                self._send_json(b.status, b.body if b.body is not None else {}, b.headers)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client gave up (timeout) before the answer
        finally:
            with owner._lock:
                owner.in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # many clients connect at once: never drop a SYN (a 1 s retransmit)
    owner: "LoopbackServer"


class LoopbackServer:
    """The server; a context manager (``start()`` / ``stop()`` also work). ``base_url`` is
    ``http://127.0.0.1:<port>/v1``; ``models`` the served model names."""

    def __init__(self, script: Callable[[dict], str | Behaviour] | str = "Prediction: none of these classes",
                 models: Sequence[str] = ("loopback-vl",), latency: float = 0.0):
        self.script = script if callable(script) else (lambda _req, _t=script: _t)
        self.models = list(models)
        self.latency = latency
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.reset()

    def reset(self) -> None:
        """Zero the counters and forget recorded requests."""
        with self._lock:
            self.requests = 0
            self.model_listings = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.bodies: list[dict] = []
            self.headers: list[dict] = []
            self.script_errors: list[str] = []

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "LoopbackServer":
        self._stop.clear()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="lvlm-loopback")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def free_port() -> int:
    """A port nothing listens on (for "server unreachable" tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:  # a pytest fixture for test files: ``from lvlm_server import loopback`` (or ``from tests.lvlm_server``)
    import pytest

    @pytest.fixture
    def loopback():
        """A factory ``loopback(script, models=..., latency=...) -> LoopbackServer`` (started); every server it
        started is stopped after the test."""
        servers: list[LoopbackServer] = []

        def start(script: Callable[[dict], str | Behaviour] | str = "Prediction: none of these classes",
                  models: Sequence[str] = ("loopback-vl",), latency: float = 0.0) -> LoopbackServer:
            servers.append(LoopbackServer(script, models, latency).start())
            return servers[-1]

        yield start
        for s in servers:
            s.stop()
except ImportError:  # pragma: no cover - used outside pytest (notebook, benchmark)
    pass
