"""Errors -> gRPC status. INVALID_ARGUMENT names the field in the message and in a
google.rpc.BadRequest detail, so clients in any language can read it."""
import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from moed.errors import CapacityError, InvalidRequestError, WorkerLostError
from moed.model.tokenizer import BrokenChatTemplate, NoChatTemplate, NoTokenizer


class RequestRejected(Exception):
    """A request the server refuses: carries the gRPC code, message and field."""

    def __init__(self, code, message, field=None):
        super().__init__(message)
        self.code = code
        self.field = field

    def __reduce__(self):       # raised in tokenizer worker processes, re-raised here
        return RequestRejected, (self.code, str(self), self.field)


def invalid(field, message):
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {message}", field)


def from_moed_error(err):
    """A request's error -> RequestRejected; anything else is ours (None)."""
    if isinstance(err, NoTokenizer):
        return RequestRejected(grpc.StatusCode.FAILED_PRECONDITION, str(err))
    if isinstance(err, NoChatTemplate):
        return RequestRejected(grpc.StatusCode.FAILED_PRECONDITION,
                               f"prompt_format: PROMPT_FORMAT_CHAT: {err}")
    if isinstance(err, BrokenChatTemplate):
        return invalid("prompt_format", f"PROMPT_FORMAT_CHAT: {err}")
    if isinstance(err, InvalidRequestError):
        field = err.field or "request"
        msg = str(err) if field in str(err) else f"{field}: {err}"
        return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, msg, field)
    if isinstance(err, CapacityError):
        return RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
    if isinstance(err, WorkerLostError):
        return RequestRejected(grpc.StatusCode.UNAVAILABLE, str(err))
    return None


def to_rpc_status(rejected):
    detail = []
    if rejected.field:
        violation = error_details_pb2.BadRequest.FieldViolation(field=rejected.field,
                                                                description=str(rejected))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        detail = [packed]
    return rpc_status.to_status(status_pb2.Status(code=rejected.code.value[0],
                                                  message=str(rejected), details=detail))


async def abort(context, rejected):
    """End the RPC with the rejection's status (raises, like context.abort)."""
    await context.abort_with_status(to_rpc_status(rejected))


__all__ = ["RequestRejected", "invalid", "from_moed_error", "abort", "to_rpc_status"]
