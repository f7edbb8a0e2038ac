"""Exception types raised by vlmood. Every message names the offending value."""
from __future__ import annotations


class VlmoodError(Exception):
    """Base class of all vlmood errors."""


class InvalidInputError(VlmoodError, ValueError):
    """A user-supplied value is malformed (empty class list, duplicate names, bad spec...)."""


class EncoderLoadError(VlmoodError, RuntimeError):
    """An encoder could not be built or its weights could not be obtained."""


class UnknownModelError(EncoderLoadError, InvalidInputError):
    """The spec names an architecture or pretrained tag that does not exist (a usage error, not the environment)."""


class CheckpointMismatchError(EncoderLoadError):
    """A checkpoint's tensors do not fit the requested architecture."""


class ImageLoadError(VlmoodError, OSError):
    """An image file is missing, unreadable, empty, not an image, or absurdly large."""


class WorkerKilledError(VlmoodError, RuntimeError):
    """A DataLoader decoding worker was killed by the operating system (usually the out-of-memory killer)."""


class NonFiniteEmbeddingError(VlmoodError, ValueError):
    """The text encoder returned NaN/Inf for some prompts (fp16 overflow, broken weights)."""


class ServiceError(VlmoodError, ConnectionError):
    """A server (an LVLM endpoint) could not be reached or answered with an error: the environment, not the
    arguments (the CLI exits with status 1)."""
