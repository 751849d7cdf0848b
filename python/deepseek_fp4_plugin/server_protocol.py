"""The OpenAI request bodies the server accepts, their checks, and the responses it writes.

Request fields follow the OpenAI API (``/v1/chat/completions``, ``/v1/completions``), plus
``top_k``, ``ignore_eos`` and ``stop_token_ids`` as vLLM and llama.cpp accept them. Values are
strict: a number must be a JSON number, a flag a JSON boolean. Fields the API defines but this
server does not implement (``n`` > 1, penalties, ``logprobs``, ``logit_bias``, tools, …) are
refused with a 400 naming them when they ask for something; unknown fields are ignored, as
llama.cpp and vLLM do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator

# ---------------------------------------------------------------------------------------
# errors


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        type: str = "invalid_request_error",
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None
) -> Dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(errors: List[Dict[str, Any]]) -> APIError:
    """The first of pydantic's (or FastAPI's) validation errors as a 400 naming the field."""
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    param = (
        "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))
        or None
    )
    kind = e.get("type", "")
    msg = str(e.get("msg", "invalid value"))
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "json_invalid":
        detail = (e.get("ctx") or {}).get("error", msg)
        return APIError(400, f"The request body is not valid JSON ({detail}).", None, code="invalid_json")
    if not loc:
        return APIError(400, "The request body must be a JSON object.", None)
    if kind == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param)
    got = e.get("input")
    shown = repr(got)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return APIError(400, f"Invalid value for '{param}': {msg} (got {shown}).", param)


# ---------------------------------------------------------------------------------------
# request bodies


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: Optional[StrictBool] = None


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored (llama.cpp, vLLM)

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = Field(default=None, strict=True, allow_inf_nan=False, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, strict=True, allow_inf_nan=False, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(default=None, ge=-1)  # -1 or 0: off
    n: Optional[StrictInt] = None
    stream: Optional[StrictBool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Any = None
    seed: Optional[StrictInt] = Field(default=None, ge=0, lt=2**63)
    presence_penalty: Optional[float] = Field(default=None, strict=True, allow_inf_nan=False, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, strict=True, allow_inf_nan=False, ge=-2, le=2)
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[StrictStr] = None
    ignore_eos: Optional[StrictBool] = None
    stop_token_ids: Optional[List[StrictInt]] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return v
        raise ValueError("must be a string or a list of strings")

    def check_supported(self) -> None:
        """400 for what the API defines but this server does not do."""
        if self.n not in (None, 1):
            raise APIError(400, "Only n = 1 is supported.", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise APIError(400, f"{name} is not supported (only 0).", name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported.", "logit_bias")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise APIError(400, f"At most 16 stop strings, got {len(self.stop)}.", "stop")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: StrictStr
    content: Any = None
    name: Optional[StrictStr] = None

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        """A string, or a list of text parts (joined); null for an empty turn."""
        if v is None or isinstance(v, str):
            return v or ""
        if isinstance(v, list):
            texts = []
            for i, part in enumerate(v):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        f'part {i}: only text parts ({{"type": "text", "text": ...}}) are supported'
                    )
                texts.append(part["text"])
            return "".join(texts)
        raise ValueError("must be a string or a list of text parts")


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[List[Any]] = None
    tool_choice: Any = None
    functions: Optional[List[Any]] = None
    response_format: Optional[Dict[str, Any]] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise APIError(
                400, "logprobs are not supported.", "logprobs" if self.logprobs else "top_logprobs"
            )
        if self.tools or self.functions:
            raise APIError(400, "Tool calls are not supported.", "tools" if self.tools else "functions")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, 'Only response_format {"type": "text"} is supported.', "response_format")

    def requested_max_tokens(self) -> Optional[int]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(_Sampling):
    prompt: Any = Field()
    echo: Optional[StrictBool] = None
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = None
    logprobs: Optional[StrictInt] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        """A string or a list of token ids; a list of one of those is taken as that one."""

        def ids(x):
            return (
                isinstance(x, list)
                and len(x) > 0
                and all(isinstance(t, int) and not isinstance(t, bool) for t in x)
            )

        if isinstance(v, list) and len(v) == 1 and (isinstance(v[0], str) or ids(v[0])):
            v = v[0]
        if isinstance(v, str) or ids(v):
            return v
        if isinstance(v, list) and len(v) > 1 and all(isinstance(x, str) or ids(x) for x in v):
            raise ValueError("one prompt per request is supported (send several requests: they are batched)")
        raise ValueError("must be a string or a non-empty list of token ids")

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo is not supported.", "echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported.", "suffix")
        if self.best_of not in (None, 1):
            raise APIError(400, "Only best_of = 1 is supported.", "best_of")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported.", "logprobs")

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def max_tokens_param(self) -> str:
        return "max_tokens"


# ---------------------------------------------------------------------------------------
# responses

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class Reply:
    """Builds the response objects of one request (one id, one creation time)."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> Dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @staticmethod
    def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def full(
        self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int
    ) -> Dict[str, Any]:
        reason = FINISH_REASONS.get(finish_reason, finish_reason)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
            out = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            out = self._head("text_completion")
        out["choices"] = [choice]
        out["usage"] = self.usage(prompt_tokens, completion_tokens)
        return out

    def chunk(
        self, text: Optional[str], finish_reason: Optional[str] = None, first: bool = False
    ) -> Dict[str, Any]:
        reason = None if finish_reason is None else FINISH_REASONS.get(finish_reason, finish_reason)
        if self.chat:
            delta: Dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            out = self._head("chat.completion.chunk")
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]
        else:
            out = self._head("text_completion")
            out["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}]
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> Dict[str, Any]:
        out = self._head("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = self.usage(prompt_tokens, completion_tokens)
        return out
