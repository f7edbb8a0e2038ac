"""Local large vision-language models (LVLMs) as OOD detectors: clients (an OpenAI-compatible HTTP server such as
vLLM, Ollama, llama.cpp's server, LM Studio or SGLang; or transformers in-process), a response cache, prompts as data
files (``prompts/lvlm/``), a robust response parser, the baseline and ReGuide detectors, and LLM-envisioned negative
labels for NegLabel. Submodules load on first use, so ``import vlmood`` needs no HTTP library."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LVLMClient": "base", "Request": "base", "Reply": "base", "GenerationParams": "base",
    "ResponseCache": "cache", "OpenAIClient": "http", "TransformersClient": "hf",
    "ParsedResponse": "parser", "parse_response": "parser", "VALID_STATUSES": "parser",
    "LVLMDetector": "detector", "envision_negatives": "envision",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
