"""The client interface every LVLM backend implements, and the request/reply records.

A client turns a chat request (a prompt or a list of chat messages, and optionally one image) into the model's text.
Implementations: :class:`vlmood.lvlm.http.OpenAIClient` (any OpenAI-compatible chat-completions server: vLLM,
Ollama, llama.cpp's server, LM Studio, SGLang) and :class:`vlmood.lvlm.hf.TransformersClient` (in-process).
Both answer many requests at once with :meth:`LVLMClient.generate_many` and read/write a
:class:`vlmood.lvlm.cache.ResponseCache` so a repeated or resumed run never pays for the same request twice.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence, Union

Messages = Union[str, list]
"""A prompt string (one user turn) or chat messages ``[{"role": ..., "content": ...}, ...]`` (OpenAI format)."""


@dataclass
class Request:
    """One generation request: ``prompt`` (string or chat messages) and an optional ``image`` (a PIL image, a path or
    encoded bytes), sent with the user turn."""

    prompt: Messages
    image: Any = None


@dataclass
class Reply:
    """The outcome of one request: ``text`` (None when it failed), ``error`` (one line, None on success),
    ``cached`` (served from the response cache), ``attempts`` (HTTP tries, 0 when cached) and ``truncated`` (the
    answer stopped at the token limit: ``finish_reason == "length"``, or ``max_tokens`` new tokens without an end)."""

    text: str | None
    error: str | None = None
    cached: bool = False
    attempts: int = 0
    truncated: bool = False


@dataclass
class GenerationParams:
    """Generation parameters that change the answer (part of the cache key): temperature 0 by default
    (deterministic), ``max_tokens``, and any ``extra`` server-specific ones."""

    temperature: float = 0.0
    max_tokens: int = 512
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, **self.extra}


class LVLMClient:
    """Interface of LVLM clients.

    Attributes: ``model_id`` (names the model in cache keys and reports, e.g. ``"http://host:8000/v1|qwen2-vl"``).
    """

    model_id: str = "lvlm"

    def generate(self, prompt: Messages, image: Any = None, **params: Any) -> str:
        """The model's answer to one request; raises :class:`vlmood.errors.VlmoodError` (one line) on failure."""
        reply = self.generate_many([Request(prompt, image)], **params)[0]
        if reply.text is None:
            from ..errors import VlmoodError

            raise VlmoodError(reply.error or "generation failed")
        return reply.text

    def generate_many(self, requests: Sequence[Request], progress: bool | None = None,
                      **params: Any) -> list[Reply]:
        """Replies in request order; a failed request gives a :class:`Reply` with ``error`` (never raises for one
        request's failure: an image the server rejects is recorded, the run goes on)."""
        raise NotImplementedError
