"""Request bytes that do not decode (a string field with invalid UTF-8, a
truncated message) are the client's mistake: INVALID_ARGUMENT naming the field,
not the INTERNAL "Exception deserializing request!" grpc answers by itself.

An interceptor, so no handler can miss it: each unary-request handler gets a
deserializer that returns an `Undecodable` instead of raising, and a behaviour
that answers it with the status before the handler runs.
"""
import inspect

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.descriptor import FieldDescriptor

from moed.server.status import abort, invalid


class Undecodable:
    def __init__(self, rejected):
        self.rejected = rejected


def _varint(data, i):
    shift = value = 0
    while True:
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def bad_utf8_field(descriptor, data, prefix=""):
    """The path of the first string field whose bytes are not UTF-8, or None."""
    i = 0
    try:
        while i < len(data):
            key, i = _varint(data, i)
            number, wire = key >> 3, key & 7
            if wire == 0:
                _, i = _varint(data, i)
            elif wire in (1, 5):
                i += 8 if wire == 1 else 4
            elif wire == 2:
                n, i = _varint(data, i)
                chunk, i = data[i:i + n], i + n
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return prefix + field.name
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    found = bad_utf8_field(field.message_type, chunk, f"{prefix}{field.name}.")
                    if found:
                        return found
            else:
                return None
    except IndexError:
        return None
    return None


def safe_deserializer(message_class):
    def deserialize(data):
        try:
            return message_class.FromString(data)
        except DecodeError:
            field = bad_utf8_field(message_class.DESCRIPTOR, data)
            if field:
                return Undecodable(invalid(field, "is not valid UTF-8"))
            return Undecodable(invalid("request", f"the bytes are not a valid "
                                                  f"{message_class.DESCRIPTOR.full_name}"))
    return deserialize


def _guarded(behavior):
    if inspect.isasyncgenfunction(behavior):
        async def stream(request, context):
            if isinstance(request, Undecodable):
                await abort(context, request.rejected)
            async for message in behavior(request, context):
                yield message
        return stream

    async def unary(request, context):
        if isinstance(request, Undecodable):
            await abort(context, request.rejected)
        return await behavior(request, context)
    return unary


class WireDecodeInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        message_class = getattr(handler.request_deserializer, "__self__", None)
        if message_class is None or not hasattr(message_class, "FromString"):
            return handler
        make = (grpc.unary_stream_rpc_method_handler if handler.response_streaming
                else grpc.unary_unary_rpc_method_handler)
        behavior = handler.unary_stream if handler.response_streaming else handler.unary_unary
        return make(_guarded(behavior), request_deserializer=safe_deserializer(message_class),
                    response_serializer=handler.response_serializer)
