"""OpenAI's HTTP API <-> engine: request bodies (pydantic), their sampling parameters,
and the response, stream-chunk and error objects, in the shapes the `openai` client
and every tool built on it read.

Unknown request fields are ignored (clients send many); fields moed cannot honour
(n > 1, echo, tools, a JSON response format, non-text content) are refused with
400 naming the field, never silently dropped.
"""
import time
from typing import Optional, Union

import grpc
from pydantic import BaseModel, ConfigDict, Field

from moed.engine.sampling_params import SamplingParams
from moed.errors import InvalidRequestError

FINISH_REASONS = {"eos": "stop", "stop_sequence": "stop", "stop_token": "stop",
                  "length": "length", "cancelled": "abort"}
COMPLETION_DEFAULT_MAX_TOKENS = 16          # OpenAI's default for /v1/completions
# gRPC code -> (HTTP status, OpenAI error type)
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
# the engine's field names -> the request body's
FIELDS = {"max_new_tokens": "max_tokens", "prompt": "prompt", "token_ids": "prompt",
          "messages": "messages"}


class APIError(Exception):
    """An error the HTTP API answers in OpenAI's shape."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def body(self):
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(param, message):
    return APIError(400, f"{param}: {message}", param=param)


def from_rejection(rejected, field_names=FIELDS):
    """A RequestRejected (gRPC code, message, field) -> APIError."""
    status, type_ = HTTP_STATUS.get(rejected.code, (500, "server_error"))
    param = field_names.get(rejected.field, rejected.field) if rejected.field else None
    message = str(rejected)
    if rejected.field and param != rejected.field:
        message = message.replace(f"sampling.{rejected.field}", param) \
                         .replace(rejected.field, param)
    return APIError(status, message, type_, param)


# ---------------------------------------------------------------- requests

class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """What completions and chat completions share."""
    model_config = ConfigDict(extra="ignore")
    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    user: Optional[str] = None
    # beyond OpenAI's, as vLLM and llama-server take them
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False

    def check_supported(self):
        if self.n != 1:
            raise bad_request("n", f"only n=1 is supported, got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options", "only with stream: true")

    @property
    def include_usage(self):
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens, logprobs, limits):
        """-> SamplingParams; its range checks answer 400 naming the body's field."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        check_stops(stops, self.stop_token_ids or (), limits)
        given = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                 "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
                 "presence_penalty": self.presence_penalty,
                 "frequency_penalty": self.frequency_penalty, "seed": self.seed}
        kw = {k: v for k, v in given.items() if v is not None}
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise bad_request("seed", f"must be in [0, 2**64), got {self.seed}")
        try:
            return SamplingParams(max_new_tokens=max_tokens, stop=stops, logprobs=logprobs,
                                  stop_token_ids=list(self.stop_token_ids or ()),
                                  ignore_eos=self.ignore_eos, **kw)
        except InvalidRequestError as e:
            param = self.param_name(e.field)
            raise bad_request(param, str(e).split(": ", 1)[-1]) from None

    def param_name(self, engine_field):
        return {"max_new_tokens": "max_tokens"}.get(engine_field, engine_field)


def check_stops(stops, stop_token_ids, limits):
    if len(stops) > limits.max_stop_strings:
        raise bad_request("stop", f"{len(stops)} stop strings; the limit is "
                          f"{limits.max_stop_strings}")
    for i, s in enumerate(stops):
        if not s:
            raise bad_request("stop", f"stop[{i}] is empty")
        if len(s) > limits.max_stop_string_chars:
            raise bad_request("stop", f"stop[{i}] has {len(s)} characters; the limit is "
                              f"{limits.max_stop_string_chars}")
    if len(stop_token_ids) > limits.max_stop_token_ids:
        raise bad_request("stop_token_ids", f"{len(stop_token_ids)} ids; the limit is "
                          f"{limits.max_stop_token_ids}")


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    def check_supported(self):
        super().check_supported()
        if self.echo:
            raise bad_request("echo", "is not supported")
        if self.suffix:
            raise bad_request("suffix", "is not supported")
        if self.best_of not in (None, 1):
            raise bad_request("best_of", f"only 1 is supported, got {self.best_of}")

    def single_prompt(self):
        """str or [token ids]: one prompt (a list of one is taken, more are refused)."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise bad_request("prompt", f"{len(p)} prompts in one request; send one")
            p = p[0]
        if not p:
            raise bad_request("prompt", "is empty")
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: Union[str, list[TextPart], None] = None

    def text(self, i):
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for j, part in enumerate(self.content):
            if part.type != "text" or part.text is None:
                raise bad_request(f"messages[{i}].content[{j}]",
                                  f"only text parts are supported, got type {part.type!r}")
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    response_format: Optional[ResponseFormat] = None

    def check_supported(self):
        super().check_supported()
        if self.tools:
            raise bad_request("tools", "tool calling is not supported")
        if self.response_format is not None and self.response_format.type != "text":
            raise bad_request("response_format", f"only type 'text' is supported, got "
                              f"{self.response_format.type!r}")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs", "needs logprobs: true")

    def conversation(self, max_chars):
        messages = [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]
        total = sum(len(m["content"]) for m in messages)
        if total > max_chars:
            raise bad_request("messages", f"{total} characters in all; the limit is {max_chars}")
        return messages

    @property
    def requested_max_tokens(self):
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self):
        return (self.top_logprobs or 0) if self.logprobs else None

    def param_name(self, engine_field):
        if engine_field == "max_new_tokens":
            return "max_completion_tokens" if self.max_completion_tokens is not None \
                else "max_tokens"
        return "top_logprobs" if engine_field == "logprobs" else engine_field


# ---------------------------------------------------------------- responses

def usage(final, include_details=True):
    u = {"prompt_tokens": final.num_prompt_tokens, "completion_tokens": final.num_output_tokens,
         "total_tokens": final.num_prompt_tokens + final.num_output_tokens}
    if include_details:
        u["prompt_tokens_details"] = {"cached_tokens": getattr(final, "num_cached_tokens", 0)}
    return u


def finish_reason(final):
    return FINISH_REASONS.get(final.finish_reason, final.finish_reason)


class ResponseIds:
    """id / created / model of one response, the same on every chunk of a stream."""

    def __init__(self, request_id, model):
        self.id, self.model, self.created = request_id, model, int(time.time())

    def envelope(self, object_):
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}


class CompletionLogprobs:
    """The legacy completions logprobs object, accumulated over a stream."""

    def __init__(self, token_text):
        self.token_text = token_text            # id -> its text
        self.offset = 0

    def of(self, entries):
        tokens, lps, tops, offsets = [], [], [], []
        for tid, lp, top in entries:
            text = self.token_text(tid)
            tokens.append(text)
            lps.append(lp)
            tops.append({self.token_text(t): v for t, v in top})
            offsets.append(self.offset)
            self.offset += len(text)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}


def chat_logprobs(entries, token_text):
    def item(tid, lp):
        text = token_text(tid)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**item(tid, lp), "top_logprobs": [item(t, v) for t, v in top]}
                        for tid, lp, top in entries]}

