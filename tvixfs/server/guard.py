"""Service errors -> gRPC status, for every handler of the server.

A client must see a status it can act on (NOT_FOUND, INVALID_ARGUMENT, ...) and a short message,
never grpcio's UNKNOWN with a Python traceback; the traceback of a genuine bug goes to our log,
once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import grpc

from tvixfs.server import damage
from tvixfs.services.wire.grpc_errors import status_for

log = logging.getLogger(__name__)

Handler = Callable[[Any], Any]
GrpcHandler = Callable[[Any, grpc.ServicerContext], Any]

_MAX_DETAIL = 300


class CancelledStreamError(Exception):
    """A request stream that ended because the server cancelled its call (server/limits.py):
    grpcio may hand that cancel to the reader as the stream's end, which must not be taken for
    a complete request (a Put would store the half it received)."""


def guard(path: str, handler: Handler, streaming: bool) -> GrpcHandler:
    """``handler(request)`` as a grpcio behaviour whose failures become proper statuses."""
    if streaming:

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from handler(request)
            except Exception as e:
                abort(path, context, e)

        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return handler(request)
        except Exception as e:
            abort(path, context, e)

    return unary


def abort(path: str, context: grpc.ServicerContext, error: Exception) -> NoReturn:
    """End the call with the status ``error`` maps to; called from an ``except`` block."""
    code = status_for(error)
    if code is grpc.StatusCode.DATA_LOSS:
        # Damaged data in the store is the operator's to know (damage.py); the rest is the client's.
        damage.report(f"{path}: {code.name}", error)
        context.abort(code, damage.CLIENT_DETAIL)
    if code is not None:
        log.debug("%s: %s: %s", path, code.name, error)
        context.abort(code, str(error)[:_MAX_DETAIL])
    if isinstance(error, CancelledStreamError):
        log.debug("%s: %s", path, error)
        context.abort(grpc.StatusCode.CANCELLED, str(error))
    if isinstance(error, grpc.RpcError) and not context.is_active():
        # The client went away while we read its request stream: nobody to answer.
        log.debug("%s: cancelled by the client", path)
        context.abort(grpc.StatusCode.CANCELLED, "cancelled by the client")
    log.error("%s: internal error", path, exc_info=error)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"[:_MAX_DETAIL])
