"""Typed errors for user mistakes.

Every error a user can cause (a missing file, an unknown architecture, a corrupt GGUF, a bad sampling value,
...) is a subclass of :class:`OpenAutoGLMError` and carries one line that says what was wrong and what to do.
The CLI turns them into exit code 2 with that line and no traceback; the server turns them into a 4xx JSON.
"""

from __future__ import annotations


class OpenAutoGLMError(Exception):
    """Base class of every error a user can cause. ``str(err)`` is one line meant for the user."""

    #: HTTP status the server answers with.
    http_status = 400
    #: OpenAI-style error code.
    code = "invalid_request_error"


class ModelNotFoundError(OpenAutoGLMError, FileNotFoundError):
    """The model path or alias does not exist."""

    http_status = 404
    code = "model_not_found"


class InvalidModelError(OpenAutoGLMError):
    """The model exists but is not something we can load (no config, bad layout)."""


class CorruptModelError(InvalidModelError):
    """The model file is corrupt or truncated."""


class UnsupportedArchitectureError(InvalidModelError):
    """The checkpoint's architecture has no implementation."""


class UnsupportedQuantTypeError(InvalidModelError):
    """A tensor uses a GGML quantization type we cannot dequantize."""


class ContextLengthExceededError(OpenAutoGLMError, ValueError):
    """The prompt does not fit in the model's context window."""

    code = "context_length_exceeded"


class InvalidParameterError(OpenAutoGLMError, ValueError):
    """An argument (sampling value, option) is out of range or of the wrong type."""


class DeviceNotAvailableError(OpenAutoGLMError, RuntimeError):
    """The requested device does not exist on this machine."""


class OptimizeLevelError(OpenAutoGLMError, ValueError):
    """The optimize level is unknown or not built yet."""


class corrupt_on_error:
    """``with corrupt_on_error("x.gguf's metadata"):`` turns an untyped exception raised while parsing untrusted
    file data (a TypeError on a value of the wrong type, a tokenizers parse error, ...) into one
    :class:`CorruptModelError` line. Typed errors and MemoryError pass through unchanged."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, et, e, tb):
        if e is None or isinstance(e, (OpenAutoGLMError, MemoryError)) or not isinstance(e, Exception):
            return False
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        detail = detail if len(detail) <= 200 else detail[:200] + "..."
        raise CorruptModelError(f"{self.what} is corrupt or malformed ({detail})") from None
