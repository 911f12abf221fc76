"""The admin token: AdminService calls need `authorization: Bearer <token>`.

An interceptor, so no admin handler can forget the check. With no token
configured, every admin call is refused: an open admin port is never the default.
"""
import hmac

import grpc

ADMIN_PREFIX = "/moed.v1.AdminService/"


def bearer_token(metadata):
    for key, value in metadata or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value[len("Bearer "):]
    return None


def is_admin(metadata, token):
    """Whether the caller presents the admin token (never true with none configured)."""
    sent = bearer_token(metadata)
    return bool(token) and sent is not None and hmac.compare_digest(sent.encode(), token.encode())


def _refuse(message):
    async def handler(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return grpc.unary_unary_rpc_method_handler(handler)


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token):
        self._token = token

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(ADMIN_PREFIX):
            return await continuation(details)
        if not self._token:
            return _refuse("admin calls are disabled: no admin token is configured "
                           "(server.admin_token or MOED_ADMIN_TOKEN)")
        if bearer_token(details.invocation_metadata) is None:
            return _refuse("admin call without `authorization: Bearer <token>` metadata")
        if not is_admin(details.invocation_metadata, self._token):
            return _refuse("admin token does not match")
        return await continuation(details)
