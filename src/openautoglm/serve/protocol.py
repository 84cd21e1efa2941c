"""Request bodies of the OpenAI API routes we serve, as pydantic models (OpenAI's field names and defaults).

Fields we do not implement are listed in ``UNSUPPORTED``: sending one with a non-default value is a 400, not a
silent no-op. Unknown fields are refused too (a typo should not pass silently).
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = "default"
    max_tokens: int | None = Field(default=None)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extra, as vLLM and llama.cpp's server accept it
    min_p: float = 0.0  # extra
    repetition_penalty: float = 1.0  # extra
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1
    user: str | None = None
    priority: int = 0  # extra: higher is served first
    timeout: float | None = None  # extra: seconds before the request is abandoned
    ignore_eos: bool = False  # extra


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list, None] = None


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_Body):
    prompt: Union[str, list[str]]
    max_tokens: int | None = 16  # OpenAI's default for /v1/completions


# field -> the value that means "not used"; anything else is refused with 400
UNSUPPORTED = {
    "n": 1, "best_of": None, "echo": False, "suffix": None, "logit_bias": None, "tools": None, "tool_choice": None,
    "functions": None, "function_call": None, "response_format": None, "presence_penalty": 0, "frequency_penalty": 0,
    "parallel_tool_calls": None, "audio": None, "modalities": None, "prediction": None,
}
IGNORED = {"user", "store", "metadata", "service_tier", "stream_options", "reasoning_effort"}
