"""Request bodies of the OpenAI API routes we serve, as pydantic models (OpenAI's field names and defaults).

Fields we do not implement are listed in ``UNSUPPORTED``: sending one with a non-default value is a 400, not a
silent no-op. Unknown fields are refused too (a typo should not pass silently). Types are strict: a string where
a number or boolean belongs is refused, not coerced, and every integer has bounds (a seed of 2**80 is a 400, not
an overflow deep in the sampler). Content parts other than text are refused by the route, naming the part.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

I32 = 2**31 - 1
_STRICT = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class _Body(BaseModel):
    model_config = _STRICT

    model: str = "default"
    max_tokens: int | None = Field(default=None, ge=-I32, le=I32)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(default=0, ge=-I32, le=I32)  # extra, as vLLM and llama.cpp's server accept it
    min_p: float = 0.0  # extra
    repetition_penalty: float = 1.0  # extra
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # OpenAI's: a 64-bit integer
    stop: Union[str, list[str], None] = Field(default=None, max_length=16)
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(default=1, ge=-I32, le=I32)
    user: str | None = None
    priority: int = Field(default=0, ge=-I32, le=I32)  # extra: higher is served first
    timeout: float | None = Field(default=None, gt=0)  # extra: seconds before the request is abandoned
    ignore_eos: bool = False  # extra


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[dict], None] = None
    tool_calls: list[dict] | None = None  # assistant: the calls it made (arguments as a JSON string)
    tool_call_id: str | None = None  # tool: the call this is the result of
    name: str | None = None


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=-I32, le=I32)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict] | None = Field(default=None, max_length=128)
    tool_choice: Union[str, dict, None] = None
    parallel_tool_calls: bool = True
    response_format: dict | None = None


class CompletionRequest(_Body):
    prompt: Union[str, list[str]]
    max_tokens: int | None = Field(default=16, ge=-I32, le=I32)  # OpenAI's default for /v1/completions


# field -> the value that means "not used"; anything else is refused with 400
UNSUPPORTED = {
    "n": 1, "best_of": None, "echo": False, "suffix": None, "logit_bias": None, "functions": None,
    "function_call": None, "presence_penalty": 0, "frequency_penalty": 0, "audio": None, "modalities": None,
    "prediction": None,
}
IGNORED = {"user", "store", "metadata", "service_tier", "stream_options", "reasoning_effort"}
