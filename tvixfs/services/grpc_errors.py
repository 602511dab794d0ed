"""Service errors <-> gRPC status codes: the one table the server and the client both use."""

from __future__ import annotations

import grpc

from tvixfs.castore.errors import ValidationError
from tvixfs.services.errors import (
    CorruptDataError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PathExistsError,
    StoreError,
    StoreUnavailableError,
)

_CODES: tuple[tuple[type[StoreError], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (FailedPreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (PathExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (StoreUnavailableError, grpc.StatusCode.UNAVAILABLE),
    # A backend that verified what it fetched and found it wrong: the data is lost to us.
    (CorruptDataError, grpc.StatusCode.DATA_LOSS),
)

# How the server's RESOURCE_EXHAUSTED for a stream over its limits begins (server/limits.py):
# unlike grpcio's own RESOURCE_EXHAUSTED (a message too large), worth trying again shortly.
STREAM_LIMIT = "too many streams"

# What grpcio's client reports (as INTERNAL) when a response message does not decode.
_UNDECODABLE = "Exception deserializing response!"


def status_for(error: BaseException) -> grpc.StatusCode | None:
    """The status code a server answers for ``error``; None for a bug (answer INTERNAL)."""
    for kind, code in _CODES:
        if isinstance(error, kind):
            return code
    if isinstance(error, ValidationError):
        # The model rejects what a client sent (bad digest length, invalid Directory, ...).
        return grpc.StatusCode.INVALID_ARGUMENT
    return None


def retryable(code: grpc.StatusCode | None, details: str | None) -> bool:
    """Whether an idempotent call that failed so may succeed if sent again shortly."""
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return (details or "").startswith(STREAM_LIMIT)
    return code is grpc.StatusCode.UNAVAILABLE


def error_for(code: grpc.StatusCode | None, details: str | None, what: str) -> StoreError:
    """The service error a client raises for a failed call about ``what``."""
    message = f"{what}: {details or (code.name if code else 'unknown error')}"
    if code is grpc.StatusCode.INTERNAL and details == _UNDECODABLE:
        return CorruptDataError(f"{what}: the server sent a message that does not decode")
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return StoreUnavailableError(f"{what}: the store did not answer in time")
    for kind, known in _CODES:
        if code is known:
            return kind(message)
    return StoreError(f"{message} ({code.name if code else 'no status'})")


def rpc_error(error: grpc.RpcError, what: str) -> StoreError:
    """``error_for`` of a raised ``grpc.RpcError`` (which is also a ``grpc.Call``)."""
    code = error.code() if isinstance(error, grpc.Call) else None
    details = error.details() if isinstance(error, grpc.Call) else str(error)
    return error_for(code, details, what)
