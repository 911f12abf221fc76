"""protobuf <-> engine. Validates what only the wire can get wrong (limits,
unknown enum values, non-finite floats, a missing oneof) before the engine
sees the request; ranges the engine already checks (SamplingParams.validate)
are not repeated here, only re-labelled with the protobuf field path."""
import math
import re

import grpc

from moed.engine.sampling_params import SamplingParams
from moed.errors import InvalidRequestError
from moed.server.gen import generation_pb2 as pb
from moed.server.status import RequestRejected, invalid

FINISH_REASONS = {
    "eos": pb.FINISH_REASON_EOS,
    "stop_sequence": pb.FINISH_REASON_STOP_SEQUENCE,
    "stop_token": pb.FINISH_REASON_STOP_TOKEN,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed", "max_new_tokens")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]+")


def field_path(engine_field, req):
    """The engine's field name -> the protobuf field path a client sees."""
    if engine_field in SAMPLING_FIELDS:
        return f"sampling.{engine_field}"
    if engine_field == "messages" and req.WhichOneof("input") == "messages":
        return "messages.messages"
    if engine_field in ("prompt", "messages"):      # a chat request's one message is `text`
        return "token_ids" if req.WhichOneof("input") == "token_ids" else "text"
    return engine_field or "request"


def check_request(req, cfg, vocab_size, context_length):
    """Wire-level checks; raises RequestRejected naming the field."""
    if len(req.request_id) > cfg.max_request_id_chars:
        raise invalid("request_id", f"longer than {cfg.max_request_id_chars} characters")
    if req.request_id and not REQUEST_ID.fullmatch(req.request_id):
        raise invalid("request_id", "may hold only letters, digits and ._:/+=@-")
    if req.prompt_format not in pb.PromptFormat.values():
        raise invalid("prompt_format", f"unknown value {req.prompt_format}")
    _check_input(req, cfg)
    if req.WhichOneof("input") == "token_ids" and len(req.token_ids.ids) >= context_length:
        raise invalid("token_ids", f"{len(req.token_ids.ids)} tokens; the context is "
                      f"{context_length}")
    _check_sampling(req.sampling)
    _check_stops(req, cfg, vocab_size)


def _check_input(req, cfg):
    kind = req.WhichOneof("input")
    if kind is None:
        raise invalid("input", "set text or token_ids")
    if kind == "text" and not req.text:
        raise invalid("text", "the prompt is empty")
    if kind == "text" and len(req.text) > cfg.max_prompt_chars:
        raise invalid("text", f"{len(req.text)} characters; the limit is {cfg.max_prompt_chars}")
    if kind == "token_ids" and not req.token_ids.ids:
        raise invalid("token_ids", "the prompt is empty")
    if kind == "token_ids" and req.prompt_format == pb.PROMPT_FORMAT_CHAT:
        raise invalid("prompt_format", "PROMPT_FORMAT_CHAT needs text, not token_ids")
    if kind == "messages":
        _check_messages(req.messages.messages, cfg)


def _check_messages(messages, cfg):
    if not messages:
        raise invalid("messages.messages", "the conversation is empty")
    total = 0
    for i, m in enumerate(messages):
        if not m.role:
            raise invalid(f"messages.messages[{i}].role", "is empty")
        total += len(m.content)
    if total > cfg.max_prompt_chars:
        raise invalid("messages.messages", f"{total} characters in all; the limit is "
                      f"{cfg.max_prompt_chars}")


def is_chat(req):
    """Whether the prompt goes through the chat template (its reply may hold reasoning)."""
    kind = req.WhichOneof("input")
    return kind == "messages" or (kind == "text" and req.prompt_format == pb.PROMPT_FORMAT_CHAT)


def _check_sampling(s):
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
        if s.HasField(name) and not math.isfinite(getattr(s, name)):
            raise invalid(f"sampling.{name}", f"must be finite, got {getattr(s, name)}")


def _check_stops(req, cfg, vocab_size):
    if len(req.stop) > cfg.max_stop_strings:
        raise invalid("stop", f"{len(req.stop)} stop strings; the limit is {cfg.max_stop_strings}")
    for i, s in enumerate(req.stop):
        if not s:
            raise invalid(f"stop[{i}]", "is empty")
        if len(s) > cfg.max_stop_string_chars:
            raise invalid(f"stop[{i}]", f"{len(s)} characters; the limit is "
                          f"{cfg.max_stop_string_chars}")
    if len(req.stop_token_ids) > cfg.max_stop_token_ids:
        raise invalid("stop_token_ids", f"{len(req.stop_token_ids)} ids; the limit is "
                      f"{cfg.max_stop_token_ids}")
    for t in req.stop_token_ids:
        if t >= vocab_size:
            raise invalid("stop_token_ids", f"{t} is outside the vocabulary [0, {vocab_size})")


def sampling_params(req):
    """GenerateRequest -> SamplingParams (its own range checks, fields re-labelled)."""
    s = req.sampling
    kw = {name: getattr(s, name) for name in SAMPLING_FIELDS if s.HasField(name)}
    if req.HasField("logprobs"):
        kw["logprobs"] = req.logprobs
    try:
        return SamplingParams(stop=list(req.stop), stop_token_ids=list(req.stop_token_ids),
                              ignore_eos=req.ignore_eos, **kw)
    except InvalidRequestError as e:
        raise invalid(field_path(e.field, req), str(e).split(": ", 1)[-1]) from None


async def prompt_ids(req, tokenizers, context_length):
    """The engine's prompt as token ids, tokenized by the pool (chat text through the
    chat template first); raises RequestRejected naming the field."""
    kind = req.WhichOneof("input")
    if kind == "token_ids":
        return list(req.token_ids.ids)          # its length checked by check_request
    try:
        if kind == "messages":
            ids = await tokenizers.encode_chat([{"role": m.role, "content": m.content}
                                                for m in req.messages.messages])
        elif req.prompt_format == pb.PROMPT_FORMAT_CHAT:
            ids = await tokenizers.encode_chat([{"role": "user", "content": req.text}])
        else:
            ids = await tokenizers.encode(req.text)
    except RequestRejected as r:
        if r.field and r.code == grpc.StatusCode.INVALID_ARGUMENT:
            why = str(r).removeprefix(f"{r.field}: ")
            raise invalid(field_path(r.field, req), why) from None
        raise
    if len(ids) >= context_length:      # before a list of them is built
        raise invalid("messages.messages" if kind == "messages" else "text",
                      f"the prompt is {len(ids)} tokens; the context is {context_length}")
    return ids.tolist()


def fit_max_new_tokens(params, req, num_prompt_tokens, context_length):
    """Left unset, max_new_tokens is the default clipped to the context the prompt leaves."""
    if not req.sampling.HasField("max_new_tokens"):
        params.max_new_tokens = min(params.max_new_tokens, context_length - num_prompt_tokens)
    return params


def chunk_response(request_id, update):
    """A streams.Update -> one Chunk message."""
    return pb.GenerateResponse(request_id=request_id, chunk=pb.Chunk(
        token_ids=update.token_ids, text=update.text, reasoning=update.reasoning,
        logprobs=[pb.TokenLogprob(token_id=tid, logprob=lp,
                                  top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in top])
                  for tid, lp, top in update.logprobs]))


def complete_response(request_id, out, timing):
    return pb.GenerateResponse(request_id=request_id, complete=pb.Complete(
        finish_reason=FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=out.num_prompt_tokens,
                       completion_tokens=out.num_output_tokens,
                       cached_prompt_tokens=getattr(out, "num_cached_tokens", 0)),
        timing=pb.Timing(queue_seconds=timing.queue_s, time_to_first_token_seconds=timing.ttft_s,
                         total_seconds=timing.total_s)))


def model_info_response(info, model_path=None):
    """model_path only for admin callers: it is a path on the server's disk."""
    return pb.GetModelInfoResponse(
        architecture=info["architecture"], context_length=info["context_length"],
        vocab_size=info["vocab_size"], weight_format=info["weight_format"], isa=info["isa"],
        device=info["device"], experts=info.get("experts", ""),
        has_tokenizer=info.get("has_tokenizer", True), reasoning=info.get("reasoning", False),
        model_path=str(model_path) if model_path is not None else "")
